//! The broker with a data directory, in process: what was acknowledged survives a restart
//! (sessions, subscriptions, queued QoS 1/2 messages, retained messages), the log is
//! compacted, and a clean session leaves nothing behind. The SIGKILL loops are in
//! `crates/qosmos/tests/durable.rs`, against the binary.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{RawClient, TestBroker, limits, paho, subscribe, wait_until};
use qosmos_mqtt::{
    Packet, PacketId, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn payloads(result: &Value) -> Vec<String> {
    result["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect()
}

/// A persistent subscriber (3.1.1 clean session false, and 5.0 with a session expiry) goes
/// away; QoS 1 and 2 messages and a retained message are acknowledged; the broker restarts;
/// the subscribers get every message once, and a new subscriber gets the retained message.
#[tokio::test]
async fn queued_messages_sessions_and_retained_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let subs = [
        json!({"port": addr.port(), "version": 311, "client_id": "sub311", "clean": false,
               "steps": [{"sub": [["d/#", 2]]}, {"disconnect": null}]}),
        json!({"port": addr.port(), "version": 5, "client_id": "sub5", "clean": false,
               "connect_props": {"SessionExpiryInterval": 3600},
               "steps": [{"sub": [["d/#", 2]]}, {"disconnect": null}]}),
    ];
    for s in subs {
        paho(s).await;
    }
    let mut steps = Vec::new();
    for i in 0..20 {
        steps.push(json!({"pub": "d/x", "payload": format!("m{i}"), "qos": 1 + i % 2}));
    }
    steps.push(json!({"pub": "r/kept", "payload": "retained", "qos": 1, "retain": true}));
    steps.push(json!({"disconnect": null}));
    paho(
        json!({"port": addr.port(), "version": 5, "client_id": "pub", "clean": true,
                "steps": steps}),
    )
    .await;
    // The publisher's script ends when its DISCONNECT is written, maybe before the broker
    // has handled it (and dropped its clean session).
    let h = b.handle.clone();
    wait_until("the publisher's session gone", || h.clients().len() == 2).await;
    drop(h); // a handle keeps the broker's store, and its lock, alive
    b.stop().await;

    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    assert_eq!(b.handle.clients().len(), 2, "sessions restored");
    for (version, id, props) in [
        (311, "sub311", json!({})),
        (5, "sub5", json!({"SessionExpiryInterval": 3600})),
    ] {
        let r = paho(
            json!({"port": addr.port(), "version": version, "client_id": id,
                            "clean": false, "connect_props": props,
                            "steps": [{"expect": 20, "timeout": 10}, {"quiet": 0.3},
                                      {"disconnect": null}]}),
        )
        .await;
        assert_eq!(r["connack"]["session_present"], json!(true), "{id}");
        // paho hands a QoS 2 message over on PUBREL, so QoS 1 and 2 interleave: compare sets.
        let mut got = payloads(&r);
        got.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        want.sort();
        assert_eq!(got, want, "{id}: every message once");
    }
    let r = paho(
        json!({"port": addr.port(), "version": 5, "client_id": "late", "clean": true,
                        "steps": [{"sub": [["r/#", 1]]}, {"expect": 1, "timeout": 10}]}),
    )
    .await;
    assert_eq!(payloads(&r), vec!["retained".to_string()]);
    assert_eq!(r["messages"][0]["retain"], json!(true));
    b.stop().await;

    // Drained: a third start owes nothing.
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let r = paho(
        json!({"port": addr.port(), "version": 311, "client_id": "sub311",
                        "clean": false, "steps": [{"quiet": 0.5}, {"disconnect": null}]}),
    )
    .await;
    assert_eq!(
        payloads(&r),
        Vec::<String>::new(),
        "nothing delivered twice"
    );
    b.stop().await;
}

/// Unsubscribing and ending a session are durable too: after a restart the session is gone
/// (clean start) or has no subscription (unsubscribed), so nothing is queued for it.
#[tokio::test]
async fn unsubscribe_and_session_end_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "a", "clean": false,
                "steps": [{"sub": [["u/#", 1], ["v/#", 1]]}, {"unsub": ["u/#"]},
                          {"disconnect": null}]}),
    )
    .await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "gone", "clean": false,
                "steps": [{"sub": [["u/#", 1]]}, {"disconnect": null}]}),
    )
    .await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "gone", "clean": true,
                "steps": [{"disconnect": null}]}),
    )
    .await;
    b.stop().await;
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let clients: BTreeMap<String, usize> = b
        .handle
        .clients()
        .into_iter()
        .map(|c| (c.client_id, c.subscriptions))
        .collect();
    assert_eq!(clients, BTreeMap::from([("a".to_string(), 1)]));
    let subs: Vec<String> = b
        .handle
        .subscriptions()
        .into_iter()
        .map(|s| s.topic)
        .collect();
    assert_eq!(subs, vec!["v/#".to_string()]);
    b.stop().await;
}

/// Many messages through a persistent session: the log is compacted and stays small.
#[tokio::test]
async fn the_log_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = qosmos_broker::Config {
        mqtt_addr: addr,
        data_dir: Some(dir.path().to_path_buf()),
        compact_min_bytes: 16 << 10,
        limits: limits(),
        ..Default::default()
    };
    let b = TestBroker::start_config(config).await;
    let payload = "x".repeat(20);
    // A subscriber online all along: every message is stored, delivered and acknowledged.
    let mut sub = common::paho_spawn(json!({
        "port": addr.port(), "version": 311, "client_id": "s", "clean": false,
        "steps": [{"sub": [["c/#", 2]]}, {"event": "subscribed"},
                  {"expect": 1000, "timeout": 60}, {"disconnect": null}]}));
    sub.wait_event("subscribed").await;
    let mut steps = Vec::new();
    for i in 0..1000 {
        steps.push(json!({"pub": "c/x", "payload": format!("{i}{payload}"), "qos": 1 + i % 2}));
    }
    steps.push(json!({"disconnect": null}));
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "p", "clean": true,
                "steps": steps}),
    )
    .await;
    let r = sub.finish().await;
    assert_eq!(r["messages"].as_array().unwrap().len(), 1000);
    let (len, stats) = b.handle.store_stats().unwrap();
    assert!(stats.compactions >= 1, "compacted: {stats:?}");
    // 1000 messages are ~100 KiB of history; what is live is one session.
    assert!(len < 64 << 10, "log of {len} bytes after compaction");
    b.stop().await;
    // The file is longer by the zeros kept ahead of the records (a step of 1 MiB at this
    // size); past the records it holds nothing but zeros.
    let data = std::fs::read(dir.path().join("wal.log")).unwrap();
    assert!(data.len() <= 4 << 20, "file of {} bytes", data.len());
    let (wal, recovered) =
        qosmos_broker::store::Wal::open(qosmos_broker::store::WalConfig::new(dir.path())).unwrap();
    assert_eq!(recovered.truncated_bytes, 0);
    let end = usize::try_from(wal.len_bytes()).unwrap();
    assert!(end < 64 << 10, "log of {end} bytes after compaction");
    assert!(data[end..].iter().all(|&b| b == 0));
    drop(wal);
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    assert_eq!(
        b.handle.clients().len(),
        1,
        "the session survived compaction"
    );
    assert_eq!(b.handle.subscriptions().len(), 1);
    b.stop().await;
}

fn publish2(topic: &str, id: u16, payload: &str, dup: bool) -> Packet {
    let mut p = Publish::new(topic, payload.to_string());
    p.qos = QoS::ExactlyOnce;
    p.packet_id = Some(id.try_into().unwrap());
    p.dup = dup;
    Packet::Publish(p)
}

fn pid(v: u16) -> PacketId {
    v.try_into().unwrap()
}

/// Every QoS 2 stage survives a restart, in both directions. Towards the subscriber: a PUBLISH
/// whose PUBREC had come is followed by PUBREL again, and one not yet answered is sent again
/// with DUP and the same packet id. From the publisher: a packet id whose PUBREL had not come
/// is still a duplicate (not routed again); once released, the id names a new message.
#[tokio::test]
async fn qos2_stages_survive_a_restart_in_both_directions() {
    const V: ProtocolVersion = ProtocolVersion::V311;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let (mut sub, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    sub.send(&subscribe("s/#", QoS::ExactlyOnce)).await;
    assert!(matches!(sub.expect().await, Packet::SubAck(_)));
    let (mut publ, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rp", false)).await;
    publ.send(&publish2("s/a", 7, "one", false)).await;
    assert!(matches!(publ.expect().await, Packet::PubRec(r) if r.packet_id == pid(7)));
    publ.send(&publish2("s/a", 8, "two", false)).await;
    assert!(matches!(publ.expect().await, Packet::PubRec(r) if r.packet_id == pid(8)));
    // The subscriber takes "one" (PUBREC, PUBREL comes, no PUBCOMP) and leaves "two" unanswered.
    let Packet::Publish(one) = sub.expect().await else {
        panic!("PUBLISH one")
    };
    assert_eq!(&one.payload[..], b"one");
    let a = one.packet_id.unwrap();
    let Packet::Publish(two) = sub.expect().await else {
        panic!("PUBLISH two")
    };
    assert_eq!(&two.payload[..], b"two");
    let bid = two.packet_id.unwrap();
    sub.send(&Packet::PubRec(PubRec::new(a))).await;
    assert!(matches!(sub.expect().await, Packet::PubRel(r) if r.packet_id == a));
    drop(sub);
    drop(publ);
    b.wait_connected("rs", false).await;
    b.wait_connected("rp", false).await;
    b.stop().await;

    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let (mut sub, ack) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    assert!(ack.session_present);
    assert!(matches!(sub.expect().await, Packet::PubRel(r) if r.packet_id == a));
    let Packet::Publish(again) = sub.expect().await else {
        panic!("PUBLISH two again")
    };
    assert_eq!(
        (again.packet_id, again.dup, &again.payload[..]),
        (Some(bid), true, &b"two"[..])
    );
    sub.send(&Packet::PubComp(PubComp::new(a))).await;
    sub.send(&Packet::PubRec(PubRec::new(bid))).await;
    assert!(matches!(sub.expect().await, Packet::PubRel(r) if r.packet_id == bid));
    sub.send(&Packet::PubComp(PubComp::new(bid))).await;

    let (mut publ, ack) = RawClient::connect(addr, RawClient::connect_packet(V, "rp", false)).await;
    assert!(ack.session_present);
    // A resend of 7: answered, not routed again.
    publ.send(&publish2("s/a", 7, "one", true)).await;
    assert!(matches!(publ.expect().await, Packet::PubRec(r) if r.packet_id == pid(7)));
    publ.send(&Packet::PubRel(PubRel::new(pid(7)))).await;
    assert!(matches!(publ.expect().await, Packet::PubComp(c) if c.packet_id == pid(7)));
    // Released: 7 is a new message now.
    publ.send(&publish2("s/a", 7, "three", false)).await;
    assert!(matches!(publ.expect().await, Packet::PubRec(r) if r.packet_id == pid(7)));
    let Packet::Publish(three) = sub.expect().await else {
        panic!("PUBLISH three")
    };
    assert_eq!(&three.payload[..], b"three", "one was not delivered twice");
    assert!(!three.dup);
    b.stop().await;
}

/// A retained message sent at SUBSCRIBE to a persistent session is owed durably: unanswered,
/// it comes again after a restart. Subscribing again before answering sends it a second time,
/// and each is owed on its own (a stored copy each), so both come again; once answered, never
/// again.
#[tokio::test]
async fn retained_deliveries_at_subscribe_survive_a_restart() {
    const V: ProtocolVersion = ProtocolVersion::V311;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "rpub", "clean": true,
                "steps": [{"pub": "r/kept", "payload": "kept", "qos": 1, "retain": true},
                          {"disconnect": null}]}),
    )
    .await;
    let (mut sub, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    for round in 0..2 {
        sub.send(&subscribe("r/#", QoS::AtLeastOnce)).await;
        let (mut subacks, mut kept) = (0, 0);
        for _ in 0..2 {
            match sub.expect().await {
                Packet::SubAck(_) => subacks += 1,
                Packet::Publish(p) if &p.payload[..] == b"kept" && p.retain => kept += 1,
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!((subacks, kept), (1, 1), "round {round}");
    }
    drop(sub);
    b.wait_connected("rs", false).await;
    b.stop().await;

    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let (mut sub, ack) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    assert!(ack.session_present);
    for copy in 0..2 {
        let Packet::Publish(again) = sub.expect().await else {
            panic!("retained copy {copy} again")
        };
        // A QoS 1 delivery is logged without its packet id: sent again as a new PUBLISH.
        assert_eq!(&again.payload[..], b"kept");
        sub.send(&Packet::PubAck(PubAck::new(again.packet_id.unwrap())))
            .await;
    }
    sub.expect_silence(std::time::Duration::from_millis(300))
        .await;
    drop(sub);
    b.wait_connected("rs", false).await;
    b.stop().await;

    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let (mut sub, ack) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    assert!(ack.session_present);
    sub.expect_silence(std::time::Duration::from_millis(300))
        .await;
    b.stop().await;
}

/// A retained message routed to a persistent session while that session subscribes again
/// (the publisher's commit still pending: syncs wait 300 ms to gather): the routed delivery
/// and the copy sent at SUBSCRIBE are owed separately, so acknowledging the copy does not
/// acknowledge the routed one, which comes again after a restart. (Found in review: answered
/// from the session's delivered message ids, the copy shared the routed delivery's entry in
/// the log.) The pause before the SUBSCRIBE gives the broker time to route the PUBLISH first;
/// if it has not, the test passes without the race.
#[tokio::test]
async fn a_retained_copy_at_subscribe_does_not_stand_for_a_routed_delivery() {
    use qosmos_broker::Config;
    use qosmos_broker::store::FsyncPolicy;
    const V: ProtocolVersion = ProtocolVersion::V311;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = |d: &std::path::Path| Config {
        mqtt_addr: addr,
        data_dir: Some(d.to_path_buf()),
        limits: limits(),
        fsync: FsyncPolicy::Batch {
            max_delay: std::time::Duration::from_millis(300),
        },
        ..Config::default()
    };
    let b = TestBroker::start_config(config(dir.path())).await;
    let (mut sub, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    sub.send(&subscribe("t", QoS::AtLeastOnce)).await;
    assert!(matches!(sub.expect().await, Packet::SubAck(_)));
    let (mut publ, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rp", true)).await;
    let mut p = Publish::new("t", bytes::Bytes::from_static(b"x"));
    p.qos = QoS::AtLeastOnce;
    p.retain = true;
    p.packet_id = PacketId::new(1);
    publ.send(&Packet::Publish(p)).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    sub.send(&subscribe("t", QoS::AtLeastOnce)).await;
    // The SUBACK, the routed delivery and (unless the SUBSCRIBE was handled before the PUBLISH
    // was routed) the retained copy right behind the SUBACK; then a PINGRESP, so that nothing
    // is left in flight.
    let mut got = Vec::new();
    let mut subacked = false;
    while !subacked || !got.iter().any(|p: &Publish| !p.retain) {
        match sub.expect().await {
            Packet::SubAck(_) => subacked = true,
            Packet::Publish(p) => got.push(p),
            other => panic!("{other:?}"),
        }
    }
    let ping = async |sub: &mut RawClient, got: &mut Vec<Publish>| {
        sub.send(&Packet::PingReq).await;
        loop {
            match sub.expect().await {
                Packet::PingResp => return,
                Packet::Publish(p) => got.push(p),
                other => panic!("{other:?}"),
            }
        }
    };
    ping(&mut sub, &mut got).await;
    assert!(matches!(publ.expect().await, Packet::PubAck(_)));
    // Only the copy sent at SUBSCRIBE (retain flag set) is acknowledged, and made durable
    // (the restart below waits for the broker to stop, which commits what is submitted).
    if let Some(copy) = got.iter().find(|p| p.retain) {
        sub.send(&Packet::PubAck(PubAck::new(copy.packet_id.unwrap())))
            .await;
        ping(&mut sub, &mut got).await;
    }
    drop(sub);
    drop(publ);
    b.wait_connected("rs", false).await;
    b.stop().await;

    let b = TestBroker::start_config(config(dir.path())).await;
    let (mut sub, ack) = RawClient::connect(addr, RawClient::connect_packet(V, "rs", false)).await;
    assert!(ack.session_present);
    let Packet::Publish(again) = sub.expect().await else {
        panic!("the routed delivery, acknowledged to its publisher, again")
    };
    assert_eq!(&again.payload[..], b"x");
    assert!(
        !again.retain,
        "the routed delivery, not the acknowledged copy"
    );
    b.stop().await;
}

/// A compaction that fails (here: its temporary file cannot be created) leaves the log in use
/// and is counted; the broker tries again once the log has doubled, not at every append, and
/// not never (found in review: it stopped compacting for good after one failure).
#[tokio::test]
async fn compaction_is_tried_again_after_a_failure() {
    const V: ProtocolVersion = ProtocolVersion::V311;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = qosmos_broker::Config {
        mqtt_addr: addr,
        data_dir: Some(dir.path().to_path_buf()),
        compact_min_bytes: 16 << 10,
        limits: limits(),
        ..Default::default()
    };
    let b = TestBroker::start_config(config).await;
    let blocker = dir.path().join("wal.log.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let (mut publ, _) = RawClient::connect(addr, RawClient::connect_packet(V, "rp", true)).await;
    async fn publish(publ: &mut RawClient, n: &mut u16) {
        *n += 1;
        let mut p = Publish::new("r", bytes::Bytes::from(vec![b'x'; 200]));
        p.qos = QoS::AtLeastOnce;
        p.retain = true;
        p.packet_id = PacketId::new(*n);
        publ.send(&Packet::Publish(p)).await;
        assert!(matches!(publ.expect().await, Packet::PubAck(_)));
    }
    let mut n = 0u16;
    let h = b.handle.clone();
    let stats = move || h.store_stats().unwrap();
    while stats().1.compaction_failures == 0 {
        publish(&mut publ, &mut n).await;
        assert!(n < 5_000, "no compaction tried: {:?}", stats());
    }
    std::fs::remove_dir(&blocker).unwrap();
    while stats().1.compactions == 0 {
        publish(&mut publ, &mut n).await;
        assert!(n < 10_000, "never compacted again: {:?}", stats());
    }
    let s = stats().1;
    assert_eq!(s.compaction_failures, 1, "one failure, not one per append");
    assert_eq!(b.metric("wal_compaction_failures"), 1);
    drop(stats);
    b.stop().await;
}

/// A will with a delay, owed when the broker stopped, is published after the restart.
#[tokio::test]
async fn a_pending_delayed_will_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    paho(
        json!({"port": addr.port(), "version": 5, "client_id": "w", "clean": true,
                "connect_props": {"SessionExpiryInterval": 60},
                "will": {"topic": "w/x", "payload": "gone", "qos": 1, "retain": false,
                         "props": {"WillDelayInterval": 2}},
                "steps": [{"abort": true}]}),
    )
    .await;
    b.wait_connected("w", false).await;
    b.stop().await;
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let r = paho(
        json!({"port": addr.port(), "version": 5, "client_id": "watch", "clean": true,
                        "steps": [{"sub": [["w/#", 1]]}, {"expect": 1, "timeout": 10}]}),
    )
    .await;
    assert_eq!(payloads(&r), vec!["gone".to_string()]);
    b.stop().await;
}

/// A full offline queue drops what does not fit, counted (metric and per client), and the store
/// forgets the dropped messages too: after a restart exactly what was queued is delivered.
#[tokio::test]
async fn queue_overflow_is_counted_and_not_resurrected_by_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let small = || qosmos_broker::Limits {
        max_queued_messages: 5,
        ..limits()
    };
    let b = TestBroker::start_durable(addr, dir.path(), small()).await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "slow", "clean": false,
                "steps": [{"sub": [["q/#", 1]]}, {"disconnect": null}]}),
    )
    .await;
    let steps: Vec<Value> = (0..10)
        .map(|i| json!({"pub": "q/x", "payload": format!("m{i}"), "qos": 1}))
        .chain([json!({"disconnect": null})])
        .collect();
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "p", "clean": true,
                "steps": steps}),
    )
    .await;
    assert_eq!(b.metric("messages_dropped_queue_full"), 5);
    let slow = b
        .handle
        .clients()
        .into_iter()
        .find(|c| c.client_id == "slow")
        .unwrap();
    assert_eq!(slow.dropped, 5);
    b.stop().await;
    // Restarted with room to spare: what was dropped must not come back.
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let r = paho(
        json!({"port": addr.port(), "version": 311, "client_id": "slow", "clean": false,
                        "steps": [{"expect": 5, "timeout": 10}, {"quiet": 0.5},
                                  {"disconnect": null}]}),
    )
    .await;
    let want: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&r), want);
    b.stop().await;
}

/// Messages stored before a restart keep their ids, and new ones get fresh ids: the ids are
/// read from inside the packed records the log holds, so two restarts in a row with messages
/// queued for an offline subscriber deliver every message once, in order.
#[tokio::test]
async fn message_ids_continue_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let publish = |prefix: &'static str| {
        let steps: Vec<Value> = (0..3)
            .map(|i| json!({"pub": "q/x", "payload": format!("{prefix}{i}"), "qos": 2}))
            .chain([json!({"disconnect": null})])
            .collect();
        json!({"port": addr.port(), "version": 5, "client_id": "p", "clean": true,
               "steps": steps})
    };
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    paho(
        json!({"port": addr.port(), "version": 5, "client_id": "slow", "clean": false,
               "connect_props": {"SessionExpiryInterval": 3600}, "steps": [{"sub": [["q/#", 2]]}, {"disconnect": null}]}),
    )
    .await;
    paho(publish("a")).await;
    b.stop().await;
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    paho(publish("b")).await;
    b.stop().await;
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let r = paho(
        json!({"port": addr.port(), "version": 5, "client_id": "slow", "clean": false,
               "connect_props": {"SessionExpiryInterval": 3600},
               "steps": [{"expect": 6, "timeout": 10}, {"quiet": 0.5}, {"disconnect": null}]}),
    )
    .await;
    assert_eq!(payloads(&r), ["a0", "a1", "a2", "b0", "b1", "b2"]);
    b.stop().await;
}

/// A QoS 2 delivery given its packet id as it is routed does not overtake one routed just
/// before it the usual way: a 5.0 subscriber with a Receive Maximum of 1, and a publisher
/// whose one read holds a QoS 1 message then a QoS 2 one. The first waits for the window (the
/// QoS 1 delivery is queued at dispatch); the second must wait behind it, not take the window
/// with a packet id reserved when it was routed.
#[tokio::test]
async fn a_delivery_numbered_when_routed_does_not_overtake_a_queued_one() {
    const V: ProtocolVersion = ProtocolVersion::V5;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let b = TestBroker::start_durable(addr, dir.path(), limits()).await;
    let mut c = RawClient::connect_packet(V, "order-sub", false);
    c.properties.set_session_expiry_interval(3600);
    c.properties.set_receive_maximum(1);
    let (mut sub, _) = RawClient::connect(addr, c).await;
    sub.send(&subscribe("o/#", QoS::ExactlyOnce)).await;
    assert!(matches!(sub.expect().await, Packet::SubAck(_)));
    let mut c = RawClient::connect_packet(V, "order-pub", false);
    c.properties.set_session_expiry_interval(3600);
    let (mut publ, _) = RawClient::connect(addr, c).await;
    // Both in one write, so that the broker handles them in one read (one store lock).
    let mut first = Publish::new("o/1", "first".to_string());
    first.qos = QoS::AtLeastOnce;
    first.packet_id = Some(pid(1));
    let mut buf = bytes::BytesMut::new();
    let enc = qosmos_mqtt::Encoder::new(V);
    enc.encode(&Packet::Publish(first), &mut buf).unwrap();
    enc.encode(&publish2("o/2", 2, "second", false), &mut buf)
        .unwrap();
    publ.send_bytes(&buf).await;
    let mut acks = 0;
    while acks < 2 {
        match publ.expect().await {
            Packet::PubAck(_) | Packet::PubRec(_) => acks += 1,
            other => panic!("expected PUBACK and PUBREC, got {other:?}"),
        }
    }
    let Packet::Publish(got) = sub.expect().await else {
        panic!("expected a PUBLISH")
    };
    assert_eq!(
        &got.payload[..],
        b"first",
        "delivered in the order published"
    );
    sub.send(&Packet::PubAck(qosmos_mqtt::PubAck::new(
        got.packet_id.unwrap(),
    )))
    .await;
    let Packet::Publish(got) = sub.expect().await else {
        panic!("expected a PUBLISH")
    };
    assert_eq!(
        (&got.payload[..], got.qos),
        (&b"second"[..], QoS::ExactlyOnce)
    );
    b.stop().await;
}

/// Compactions while messages are owed to an offline session and others are delivered and
/// acknowledged by an online one: each snapshot is the log read back and replayed on the
/// compaction's thread while appends go on; after a restart the offline session gets every
/// message once.
/// (It caught the WAL writer dropping appends gathered into the commit that finished a
/// compaction, about one run in ten; see `tests/wal.rs`.)
/// (200 messages: the publisher's script says nothing until it is done, and the harness gives
/// a script 20 s per line.)
#[tokio::test]
async fn compactions_under_load_keep_every_owed_message() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = qosmos_broker::Config {
        mqtt_addr: addr,
        data_dir: Some(dir.path().to_path_buf()),
        compact_min_bytes: 2 << 10,
        limits: limits(),
        ..Default::default()
    };
    let b = TestBroker::start_config(config.clone()).await;
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "away", "clean": false,
               "steps": [{"sub": [["k/#", 2]]}, {"disconnect": null}]}),
    )
    .await;
    let mut online = common::paho_spawn(json!({
        "port": addr.port(), "version": 311, "client_id": "here", "clean": false,
        "steps": [{"sub": [["k/#", 2]]}, {"event": "subscribed"},
                  {"expect": 200, "timeout": 15}, {"disconnect": null}]}));
    online.wait_event("subscribed").await;
    let mut steps = Vec::new();
    for i in 0..200 {
        steps.push(json!({"pub": "k/x", "payload": format!("k{i}"), "qos": 1 + i % 2}));
    }
    steps.push(json!({"disconnect": null}));
    paho(
        json!({"port": addr.port(), "version": 311, "client_id": "p", "clean": true,
                "steps": steps}),
    )
    .await;
    assert_eq!(
        online.finish().await["messages"].as_array().unwrap().len(),
        200
    );
    let (_, stats) = b.handle.store_stats().unwrap();
    assert!(
        stats.compactions >= 2,
        "compacted more than once: {stats:?}"
    );
    b.stop().await;

    let b = TestBroker::start_config(config).await;
    let r = paho(
        json!({"port": addr.port(), "version": 311, "client_id": "away", "clean": false,
               "steps": [{"expect": 200, "timeout": 15}, {"quiet": 0.3}, {"disconnect": null}]}),
    )
    .await;
    let mut got = payloads(&r);
    got.sort();
    let mut want: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    want.sort();
    assert_eq!(got, want, "every owed message once");
    b.stop().await;
}
