//! The client against a scripted broker built with `qosmos-mqtt`'s codec: packet-level checks
//! that a real broker cannot be made to do on demand (resends, refusals, lost acks).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{FakeBroker, opts, wait_event, within};
use qosmos_client::{Client, ClientError, ClientEvent, SubscribeOptions, SubscribeOutcome};
use qosmos_mqtt::{
    Packet, PacketId, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode,
    RetainHandling, SubAck,
};
use std::time::Duration;

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn qos2_publish(id: u16, payload: &'static str, dup: bool) -> Packet {
    let mut p = Publish::new("orders/1", payload);
    p.qos = QoS::ExactlyOnce;
    p.packet_id = Some(pid(id));
    p.dup = dup;
    Packet::Publish(p)
}

/// The broker sends the same QoS 2 PUBLISH twice before PUBREL: the application gets it once.
#[tokio::test]
async fn duplicate_qos2_publish_is_handed_over_once() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V311))
        .await
        .unwrap();
    let mut messages = client.messages();
    let mut peer = fake.accept(ProtocolVersion::V311).await;
    peer.handshake(false).await;

    peer.send(qos2_publish(1, "order", false)).await;
    peer.send(qos2_publish(1, "order", true)).await;
    let first = within("first delivery", messages.recv()).await.unwrap();
    assert_eq!(&first.payload[..], b"order");
    drop(first); // handled: PUBREC may go now
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubRec(PubRec::new(pid(1)))
    );
    // Resent again after PUBREC (the PUBREC "got lost"): answered, not delivered.
    peer.send(qos2_publish(1, "order", true)).await;
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubRec(PubRec::new(pid(1)))
    );
    peer.send(Packet::PubRel(PubRel::new(pid(1)))).await;
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubComp(PubComp::new(pid(1)))
    );
    // A sentinel proves nothing else was queued for the application in between.
    peer.send(Packet::Publish(Publish::new("orders/1", "sentinel")))
        .await;
    let next = within("sentinel", messages.recv()).await.unwrap();
    assert_eq!(&next.payload[..], b"sentinel");
    assert_eq!(client.stats().duplicates_dropped, 2);
    assert_eq!(client.stats().received, 2);
}

/// A broker that sends PUBREL before our PUBREC (seen from a broker applying a dead
/// connection's PUBREC to the session's new one): the client does not drop the connection
/// (it would meet the same PUBREL on every reconnect), delivers the message once, and ends the
/// exchange with PUBCOMP once the handler is done.
#[tokio::test]
async fn pubrel_before_our_pubrec_is_completed_not_fatal() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V5))
        .await
        .unwrap();
    let mut messages = client.messages();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;

    peer.send(qos2_publish(3, "order", false)).await;
    let first = within("delivery", messages.recv()).await.unwrap();
    peer.send(Packet::PubRel(PubRel::new(pid(3)))).await;
    peer.send(qos2_publish(3, "order", true)).await;
    // A QoS 0 sentinel read after them proves both were handled while the order is held.
    peer.send(Packet::Publish(Publish::new("orders/1", "sentinel")))
        .await;
    let next = within("sentinel", messages.recv()).await.unwrap();
    assert_eq!(
        &next.payload[..],
        b"sentinel",
        "the resend was delivered again"
    );
    drop(first); // handled
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubComp(PubComp::new(pid(3)))
    );
    assert_eq!(client.stats().received, 2);
}

/// PUBACK / PUBREC leave only after the handler returns; an AckHandle delays them further.
#[tokio::test]
async fn acknowledged_only_after_the_handler_returns() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V5))
        .await
        .unwrap();
    let (entered_tx, mut entered) = tokio::sync::mpsc::channel::<()>(4);
    let (release_tx, release) = tokio::sync::mpsc::channel::<()>(4);
    let release = std::sync::Arc::new(tokio::sync::Mutex::new(release));
    let (kept_tx, mut kept) = tokio::sync::mpsc::channel(4);
    client.route("orders/+", move |m| {
        let entered = entered_tx.clone();
        let release = release.clone();
        let kept = kept_tx.clone();
        async move {
            entered.send(()).await.unwrap();
            release.lock().await.recv().await;
            if m.qos == QoS::ExactlyOnce {
                // Manual acknowledgement: keep the handle beyond the handler.
                kept.send(m.ack_handle().unwrap()).await.unwrap();
            }
        }
    });
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;

    let mut p = Publish::new("orders/1", "a");
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(pid(5));
    peer.send(Packet::Publish(p)).await;
    within("handler entered", entered.recv()).await.unwrap();
    // The handler is blocked: nothing may be acknowledged. Ask for a PINGRESP-free probe: a
    // QoS 0 message cannot overtake, so the next packet we see must be the PUBACK, and only
    // after release.
    let got_early = tokio::time::timeout(Duration::from_millis(200), peer.recv_no_ping()).await;
    assert!(
        got_early.is_err(),
        "acknowledged before the handler returned"
    );
    release_tx.send(()).await.unwrap();
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubAck(PubAck::new(pid(5)))
    );

    peer.send(qos2_publish(6, "b", false)).await;
    within("handler entered", entered.recv()).await.unwrap();
    release_tx.send(()).await.unwrap();
    let handle = within("ack handle", kept.recv()).await.unwrap();
    assert_eq!(handle.packet_id(), 6);
    let got_early = tokio::time::timeout(Duration::from_millis(200), peer.recv_no_ping()).await;
    assert!(
        got_early.is_err(),
        "acknowledged while an AckHandle is held"
    );
    handle.ack();
    assert_eq!(
        peer.recv_no_ping().await,
        Packet::PubRec(PubRec::new(pid(6)))
    );
}

/// A PUBACK or PUBREC with a failure code fails the publish with that code (5.0).
#[tokio::test]
async fn refused_publish_carries_the_reason_code() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V5))
        .await
        .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;

    let c = client.clone();
    let q1 = tokio::spawn(async move { c.publish_to("t", QoS::AtLeastOnce, "x").await });
    let Packet::Publish(p) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    let mut ack = PubAck::new(p.packet_id.unwrap());
    ack.reason_code = ReasonCode::NOT_AUTHORIZED;
    peer.send(Packet::PubAck(ack)).await;
    let err = within("refusal", q1).await.unwrap().unwrap_err();
    assert_eq!(err, ClientError::PublishRefused(ReasonCode::NOT_AUTHORIZED));

    let c = client.clone();
    let q2 = tokio::spawn(async move { c.publish_to("t", QoS::ExactlyOnce, "x").await });
    let Packet::Publish(p) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    let mut rec = PubRec::new(p.packet_id.unwrap());
    rec.reason_code = ReasonCode::QUOTA_EXCEEDED;
    peer.send(Packet::PubRec(rec)).await;
    let err = within("refusal", q2).await.unwrap().unwrap_err();
    assert_eq!(err, ClientError::PublishRefused(ReasonCode::QUOTA_EXCEEDED));
    assert_eq!(client.stats().publish_refused, 2);
}

/// Offline, the queue is bounded: the message beyond the bound is an error, not a drop.
#[tokio::test]
async fn offline_queue_overflow_is_an_error() {
    let port = common::free_port(); // nobody listens
    let client = Client::connect(opts(port, ProtocolVersion::V5).offline_queue(2))
        .await
        .unwrap();
    let mut a = Box::pin(client.publish_to("t", QoS::AtLeastOnce, "1"));
    let mut b = Box::pin(client.publish_to("t", QoS::ExactlyOnce, "2"));
    tokio::select! {
        biased;
        r = &mut a => panic!("{r:?}"),
        r = &mut b => panic!("{r:?}"),
        _ = std::future::ready(()) => {}
    }
    let err = within(
        "third publish",
        client.publish_to("t", QoS::AtLeastOnce, "3"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::QueueFull { .. }), "{err}");
    assert_eq!(client.stats().queue_full, 1);
}

/// The connection drops before PUBACK. On a resumed session the PUBLISH is sent again with DUP
/// and the same packet identifier; on a lost one it is sent again as a new message (and
/// reported). Either way the caller's publish resolves once, on the acknowledgement.
#[tokio::test]
async fn unacknowledged_publish_is_resent_after_reconnect() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(
        opts(fake.port, ProtocolVersion::V5)
            .clean_start(false)
            .session_expiry(60),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let c = client.clone();
    let publish = tokio::spawn(async move { c.publish_to("t", QoS::AtLeastOnce, "m").await });
    let Packet::Publish(first) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    assert!(!first.dup);
    drop(peer);

    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(true).await;
    let Packet::Publish(again) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    assert!(again.dup, "resent with DUP on a resumed session");
    assert_eq!(again.packet_id, first.packet_id);
    drop(peer);

    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let Packet::Publish(fresh) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    assert!(!fresh.dup, "a new message for a session the broker lost");
    assert_eq!(&fresh.payload[..], b"m");
    wait_event(&mut events, "republished", |e| {
        matches!(e, ClientEvent::Republished { count: 1 })
    })
    .await;
    peer.send(Packet::PubAck(PubAck::new(fresh.packet_id.unwrap())))
        .await;
    let done = within("publish resolves", publish).await.unwrap().unwrap();
    assert_eq!(done.qos, QoS::AtLeastOnce);
}

/// Every 5.0 option of a subscription survives a restore; with the session present nothing is
/// sent again.
#[tokio::test]
async fn restore_keeps_every_option_and_skips_a_present_session() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V5))
        .await
        .unwrap();
    let wanted = SubscribeOptions::new(QoS::ExactlyOnce)
        .no_local(true)
        .retain_as_published(true)
        .retain_handling(RetainHandling::DoNotSend)
        .subscription_identifier(42);
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let c = client.clone();
    let sub = tokio::spawn(async move { c.subscribe("orders/#", wanted).await });
    let Packet::Subscribe(s1) = peer.recv_no_ping().await else {
        panic!("expected SUBSCRIBE")
    };
    peer.send(Packet::SubAck(SubAck {
        packet_id: s1.packet_id,
        reason_codes: vec![ReasonCode::GRANTED_QOS_2],
        properties: Default::default(),
    }))
    .await;
    assert_eq!(
        within("suback", sub).await.unwrap().unwrap(),
        SubscribeOutcome::Granted(QoS::ExactlyOnce)
    );
    drop(peer);

    // Session lost: the same SUBSCRIBE again.
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let Packet::Subscribe(s2) = peer.recv_no_ping().await else {
        panic!("expected SUBSCRIBE")
    };
    assert_eq!(s2.subscriptions, s1.subscriptions);
    assert_eq!(s2.properties, s1.properties);
    assert_eq!(
        s2.properties.subscription_identifiers().collect::<Vec<_>>(),
        [42]
    );
    peer.send(Packet::SubAck(SubAck {
        packet_id: s2.packet_id,
        reason_codes: vec![ReasonCode::GRANTED_QOS_1],
        properties: Default::default(),
    }))
    .await;
    drop(peer);

    // Session present: nothing resubscribed; the next packet is the publish we ask for.
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(true).await;
    let c = client.clone();
    tokio::spawn(async move { c.publish_to("probe", QoS::AtMostOnce, "p").await });
    let Packet::Publish(p) = peer.recv_no_ping().await else {
        panic!("expected the probe PUBLISH, not a SUBSCRIBE")
    };
    assert_eq!(p.topic, "probe");
    let stats = client.stats();
    assert_eq!(stats.subscribe_packets, 2);
    assert_eq!(stats.downgrades, 1, "the restore's QoS 1 grant was noticed");
}

/// A refused subscription is an error with the code, counted, and not kept.
#[tokio::test]
async fn refused_subscription_is_an_error() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V311))
        .await
        .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V311).await;
    peer.handshake(false).await;
    let c = client.clone();
    let sub = tokio::spawn(async move { c.subscribe("secret/#", QoS::AtLeastOnce).await });
    let Packet::Subscribe(s) = peer.recv_no_ping().await else {
        panic!("expected SUBSCRIBE")
    };
    peer.send(Packet::SubAck(SubAck {
        packet_id: s.packet_id,
        reason_codes: vec![ReasonCode::UNSPECIFIED_ERROR],
        properties: Default::default(),
    }))
    .await;
    let err = within("suback", sub).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::SubscribeRefused {
                reason: ReasonCode(0x80),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(client.stats().subscribe_refusals, 1);
    assert!(client.subscriptions().await.unwrap().is_empty());
}

/// Keep alive: PINGREQ when idle.
#[tokio::test]
async fn pings_when_idle() {
    let fake = FakeBroker::bind().await;
    let _client = Client::connect(opts(fake.port, ProtocolVersion::V311).keep_alive(1))
        .await
        .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V311).await;
    let connect = peer.handshake(false).await;
    assert_eq!(connect.keep_alive, 1);
    assert_eq!(peer.recv().await, Packet::PingReq);
    peer.send(Packet::PingResp).await;
    assert_eq!(peer.recv().await, Packet::PingReq);
}

/// Shutdown waits for the acknowledgement of what is in flight, then sends DISCONNECT.
#[tokio::test]
async fn shutdown_waits_for_inflight_acknowledgements() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V5))
        .await
        .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let c = client.clone();
    let publish = tokio::spawn(async move { c.publish_to("t", QoS::ExactlyOnce, "m").await });
    let Packet::Publish(p) = peer.recv_no_ping().await else {
        panic!("expected PUBLISH")
    };
    let c = client.clone();
    let shutdown = tokio::spawn(async move { c.disconnect().await });
    let id = p.packet_id.unwrap();
    peer.send(Packet::PubRec(PubRec::new(id))).await;
    assert_eq!(peer.recv_no_ping().await, Packet::PubRel(PubRel::new(id)));
    assert!(!shutdown.is_finished());
    peer.send(Packet::PubComp(PubComp::new(id))).await;
    assert!(matches!(peer.recv_no_ping().await, Packet::Disconnect(_)));
    within("shutdown", shutdown).await.unwrap();
    assert!(within("publish", publish).await.unwrap().is_ok());
    let err = client
        .publish_to("t", QoS::AtMostOnce, "late")
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::Closed);
}

/// Backpressure: with the handler stuck, the client stops reading the socket, so the broker's
/// writes stall instead of the client buffering without bound; once the handler goes on,
/// everything arrives.
#[tokio::test]
async fn a_slow_handler_stops_socket_reads() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const N: usize = 512;
    const SIZE: usize = 128 * 1024; // 64 MiB in all: far more than socket buffers hold

    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V311).delivery_capacity(1))
        .await
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let count = Arc::new(AtomicUsize::new(0));
    let (all_tx, mut all) = tokio::sync::mpsc::channel::<()>(1);
    {
        let gate = gate.clone();
        let count = count.clone();
        client.route("big", move |_m| {
            let gate = gate.clone();
            let count = count.clone();
            let all_tx = all_tx.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                gate.add_permits(1);
                if count.fetch_add(1, Ordering::SeqCst) + 1 == N {
                    all_tx.send(()).await.unwrap();
                }
            }
        });
    }
    let mut peer = fake.accept(ProtocolVersion::V311).await;
    peer.handshake(false).await;
    let payload = bytes::Bytes::from(vec![7u8; SIZE]);
    let mut writer = tokio::spawn(async move {
        for _ in 0..N {
            peer.send(Packet::Publish(Publish::new("big", payload.clone())))
                .await;
        }
        peer
    });
    // Bounded wait for a negative: the writes must not all go through while the handler waits.
    let early = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
    assert!(
        early.is_err(),
        "the client read 64 MiB with its handler stuck"
    );
    assert_eq!(count.load(Ordering::SeqCst), 0);

    gate.add_permits(1);
    let _peer = within("the writes to finish", writer).await.unwrap();
    within("every message handled", all.recv()).await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), N);
}

/// A message the handlers had no room for when the connection dropped is neither lost nor
/// acknowledged unhandled: it is handed over after the reconnection, once, and the broker's
/// resends of it are answered without a second delivery.
#[tokio::test]
async fn a_stalled_message_survives_a_reconnect() {
    use std::sync::Arc;
    let fake = FakeBroker::bind().await;
    let client = Client::connect(
        opts(fake.port, ProtocolVersion::V5)
            .clean_start(false)
            .session_expiry(60)
            .delivery_capacity(1),
    )
    .await
    .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<String>(16);
    {
        let gate = gate.clone();
        client.route("#", move |m| {
            let gate = gate.clone();
            let seen = seen_tx.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                seen.send(m.payload_str().unwrap_or("").to_owned())
                    .await
                    .unwrap();
            }
        });
    }
    let publish = |id: u16, dup: bool| {
        let mut p = Publish::new("t", format!("m{id}"));
        p.qos = QoS::AtLeastOnce;
        p.packet_id = Some(pid(id));
        p.dup = dup;
        Packet::Publish(p)
    };
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    for id in 1..=3 {
        peer.send(publish(id, false)).await;
    }
    // m1 in the handler, m2 in the channel, m3 stalled in the connection task.
    within("three messages read", async {
        while client.stats().received < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(peer);

    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(true).await;
    for id in 1..=3 {
        peer.send(publish(id, true)).await;
    }
    gate.add_permits(100);
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 3 {
        match peer.recv_no_ping().await {
            Packet::PubAck(a) => assert!(acked.insert(a.packet_id.get()), "PUBACK twice"),
            p => panic!("unexpected {p:?}"),
        }
    }
    peer.send(Packet::Publish(Publish::new("t", "sentinel")))
        .await;
    let mut got = Vec::new();
    loop {
        let m = within("handled", seen.recv()).await.unwrap();
        if m == "sentinel" {
            break;
        }
        got.push(m);
    }
    got.sort();
    assert_eq!(got, ["m1", "m2", "m3"], "each message handled exactly once");
}

/// A panicking handler does not stop delivery.
#[tokio::test]
async fn a_panicking_handler_does_not_stop_delivery() {
    let fake = FakeBroker::bind().await;
    let client = Client::connect(opts(fake.port, ProtocolVersion::V311))
        .await
        .unwrap();
    client.route("boom", |_m| async move { panic!("handler bug") });
    let mut messages = client.messages();
    let mut peer = fake.accept(ProtocolVersion::V311).await;
    peer.handshake(false).await;
    peer.send(Packet::Publish(Publish::new("boom", "1"))).await;
    peer.send(Packet::Publish(Publish::new("fine", "2"))).await;
    let first = within("first", messages.recv()).await.unwrap();
    assert_eq!(first.topic, "boom");
    let second = within("second", messages.recv()).await.unwrap();
    assert_eq!(second.topic, "fine");
}

/// Unsubscribing by filter removes it from the registry: a later restore leaves it out; made
/// offline, the broker is told on the next resumed session.
#[tokio::test]
async fn unsubscribe_removes_from_the_registry() {
    use qosmos_mqtt::UnsubAck;
    let fake = FakeBroker::bind().await;
    let client = Client::connect(
        opts(fake.port, ProtocolVersion::V5)
            .clean_start(false)
            .session_expiry(60),
    )
    .await
    .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    for filter in ["a/#", "b/#", "c/#"] {
        let c = client.clone();
        let sub = tokio::spawn(async move { c.subscribe(filter, QoS::AtLeastOnce).await });
        let Packet::Subscribe(s) = peer.recv_no_ping().await else {
            panic!("expected SUBSCRIBE")
        };
        peer.send(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Default::default(),
        }))
        .await;
        within("suback", sub).await.unwrap().unwrap();
    }
    let c = client.clone();
    let unsub = tokio::spawn(async move { c.unsubscribe("a/#").await });
    let Packet::Unsubscribe(u) = peer.recv_no_ping().await else {
        panic!("expected UNSUBSCRIBE")
    };
    assert_eq!(u.filters, ["a/#"]);
    peer.send(Packet::UnsubAck(UnsubAck {
        packet_id: u.packet_id,
        reason_codes: vec![ReasonCode::SUCCESS],
        properties: Default::default(),
    }))
    .await;
    within("unsuback", unsub).await.unwrap().unwrap();

    // Offline unsubscribe: sent when the session resumes.
    let mut events = client.events();
    drop(peer);
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    within("offline unsubscribe", client.unsubscribe("b/#"))
        .await
        .unwrap();
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(true).await;
    let Packet::Unsubscribe(u) = peer.recv_no_ping().await else {
        panic!("expected UNSUBSCRIBE on the resumed session")
    };
    assert_eq!(u.filters, ["b/#"]);
    drop(peer);

    // Session lost: only what is left is restored.
    let mut peer = fake.accept(ProtocolVersion::V5).await;
    peer.handshake(false).await;
    let Packet::Subscribe(s) = peer.recv_no_ping().await else {
        panic!("expected SUBSCRIBE")
    };
    let filters: Vec<_> = s
        .subscriptions
        .iter()
        .map(|s| s.filter.to_string())
        .collect();
    assert_eq!(filters, ["c/#"]);
}
