//! The client against real brokers, over TCP: Mosquitto and our own `qosmos-broker`. Each
//! scenario runs against both (except `max_qos`, which only Mosquitto can be told).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Mosquitto, Proxy, QosmosBroker, TestBroker, opts, wait_event, within};
use qosmos_client::{Client, ClientError, ClientEvent, SubscribeOutcome, SubscriptionState};
use qosmos_mqtt::{ProtocolVersion, QoS};
use std::net::SocketAddr;

/// The seed: subscribe "TEST" at QoS 2; the broker restarts without persistence; the client
/// subscribes again at QoS 2 (not 0) and the next message still arrives at QoS 2.
async fn seed_scenario(mut broker: impl TestBroker, version: ProtocolVersion) {
    broker.start().await;
    let client = Client::connect(opts(broker.port(), version).fail_fast(true))
        .await
        .unwrap();
    let mut messages = client.messages();
    let granted = within("subscribe", client.subscribe("TEST", QoS::ExactlyOnce))
        .await
        .unwrap();
    assert_eq!(granted, SubscribeOutcome::Granted(QoS::ExactlyOnce));

    let mut events = client.events();
    broker.stop().await;
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    broker.start().await;
    let ev = wait_event(&mut events, "connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    assert_eq!(
        ev,
        ClientEvent::Connected {
            session_present: false
        }
    );
    let ev = wait_event(&mut events, "TEST restored", |e| {
        matches!(e, ClientEvent::Subscribed { .. })
    })
    .await;
    assert_eq!(
        ev,
        ClientEvent::Subscribed {
            filter: "TEST".into(),
            outcome: SubscribeOutcome::Granted(QoS::ExactlyOnce),
            restored: true
        }
    );

    let publisher = Client::connect(opts(broker.port(), version).fail_fast(true))
        .await
        .unwrap();
    let done = within(
        "publish",
        publisher.publish_to("TEST", QoS::ExactlyOnce, "order-1"),
    )
    .await
    .unwrap();
    assert_eq!(done.qos, QoS::ExactlyOnce);
    let msg = within("message", messages.recv()).await.unwrap();
    assert_eq!(msg.topic, "TEST");
    assert_eq!(&msg.payload[..], b"order-1");
    assert_eq!(
        msg.qos,
        QoS::ExactlyOnce,
        "the restored subscription is QoS 2"
    );

    let stats = client.stats();
    assert_eq!(stats.subscriptions_restored, 1);
    assert_eq!(stats.subscribe_packets, 2);
    assert_eq!(stats.downgrades, 0);
    let subs = client.subscriptions().await.unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].options.qos, QoS::ExactlyOnce);
    assert_eq!(
        subs[0].state,
        SubscriptionState::Granted(SubscribeOutcome::Granted(QoS::ExactlyOnce))
    );
    drop(msg); // handled: acknowledged, so the shutdowns below need not wait
    publisher.disconnect().await;
    client.disconnect().await;
}

#[tokio::test]
async fn mosquitto_seed_broker_restart_keeps_qos2_v311() {
    seed_scenario(Mosquitto::new(""), ProtocolVersion::V311).await;
}

#[tokio::test]
async fn mosquitto_seed_broker_restart_keeps_qos2_v5() {
    seed_scenario(Mosquitto::new(""), ProtocolVersion::V5).await;
}

#[tokio::test]
async fn qosmos_seed_broker_restart_keeps_qos2_v311() {
    seed_scenario(QosmosBroker::new(), ProtocolVersion::V311).await;
}

#[tokio::test]
async fn qosmos_seed_broker_restart_keeps_qos2_v5() {
    seed_scenario(QosmosBroker::new(), ProtocolVersion::V5).await;
}

/// Fail fast reports an unreachable broker; without it, a subscribe made while the broker is
/// down is recorded, sent once it is up, and answered then.
async fn subscribe_before_the_broker_is_up(mut broker: impl TestBroker) {
    let err = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");

    let client = Client::connect(opts(broker.port(), ProtocolVersion::V5))
        .await
        .unwrap();
    assert!(!client.is_connected());
    let mut messages = client.messages();
    let mut sub = Box::pin(client.subscribe("orders/+", QoS::ExactlyOnce));
    tokio::select! {
        biased;
        r = &mut sub => panic!("subscribe answered with no broker: {r:?}"),
        _ = std::future::ready(()) => {}
    }
    // Commands are handled in order: the subscription is in the registry now.
    let subs = client.subscriptions().await.unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].state, SubscriptionState::Unconfirmed);

    broker.start().await;
    let granted = within("subscribe after connect", sub).await.unwrap();
    assert_eq!(granted, SubscribeOutcome::Granted(QoS::ExactlyOnce));

    let publisher = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap();
    within(
        "publish",
        publisher.publish_to("orders/7", QoS::ExactlyOnce, "hello"),
    )
    .await
    .unwrap();
    let msg = within("message", messages.recv()).await.unwrap();
    assert_eq!(
        (msg.topic.as_str(), msg.qos),
        ("orders/7", QoS::ExactlyOnce)
    );
    drop(msg); // handled: acknowledged, so the shutdowns below need not wait
    client.disconnect().await;
    publisher.disconnect().await;
}

#[tokio::test]
async fn mosquitto_subscribe_before_the_broker_is_up() {
    subscribe_before_the_broker_is_up(Mosquitto::new("")).await;
}

#[tokio::test]
async fn qosmos_subscribe_before_the_broker_is_up() {
    subscribe_before_the_broker_is_up(QosmosBroker::new()).await;
}

/// With a persistent session that the broker keeps, a reconnect resubscribes nothing: exactly
/// one SUBSCRIBE is ever sent, and the kept subscription still delivers at QoS 2.
async fn no_resubscribe_with_session(mut broker: impl TestBroker, version: ProtocolVersion) {
    broker.start().await;
    let upstream: SocketAddr = ([127, 0, 0, 1], broker.port()).into();
    let proxy = Proxy::start(upstream).await;
    let id = format!("persistent-{version}");
    let client = Client::connect(
        opts(proxy.port, version)
            .client_id(id.as_str())
            .clean_start(false)
            .session_expiry(300)
            .fail_fast(true),
    )
    .await
    .unwrap();
    let mut messages = client.messages();
    let granted = within("subscribe", client.subscribe("acks/+", QoS::ExactlyOnce))
        .await
        .unwrap();
    assert_eq!(granted, SubscribeOutcome::Granted(QoS::ExactlyOnce));

    let mut events = client.events();
    proxy.cut();
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    let ev = wait_event(&mut events, "reconnected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    assert_eq!(
        ev,
        ClientEvent::Connected {
            session_present: true
        }
    );

    let publisher = Client::connect(opts(broker.port(), version).fail_fast(true))
        .await
        .unwrap();
    within(
        "publish",
        publisher.publish_to("acks/1", QoS::ExactlyOnce, "ok"),
    )
    .await
    .unwrap();
    let msg = within("message", messages.recv()).await.unwrap();
    assert_eq!(msg.qos, QoS::ExactlyOnce);

    let stats = client.stats();
    assert_eq!(stats.connects, 2);
    assert_eq!(
        stats.subscribe_packets, 1,
        "no SUBSCRIBE on a resumed session"
    );
    assert_eq!(stats.subscriptions_restored, 0);
    drop(msg); // handled: acknowledged, so the shutdowns below need not wait
    publisher.disconnect().await;
    client.disconnect().await;
}

#[tokio::test]
async fn mosquitto_no_resubscribe_when_session_present_v311() {
    no_resubscribe_with_session(Mosquitto::new(""), ProtocolVersion::V311).await;
}

#[tokio::test]
async fn mosquitto_no_resubscribe_when_session_present_v5() {
    no_resubscribe_with_session(Mosquitto::new(""), ProtocolVersion::V5).await;
}

#[tokio::test]
async fn qosmos_no_resubscribe_when_session_present_v311() {
    no_resubscribe_with_session(QosmosBroker::new(), ProtocolVersion::V311).await;
}

#[tokio::test]
async fn qosmos_no_resubscribe_when_session_present_v5() {
    no_resubscribe_with_session(QosmosBroker::new(), ProtocolVersion::V5).await;
}

/// `max_qos 1`: a QoS 2 subscription is granted QoS 1. That is reported, not hidden: in the
/// result, as an event, in the counters, and again when the subscription is restored.
#[tokio::test]
async fn mosquitto_downgrade_is_detected_and_checked_again_at_restore() {
    let mut broker = Mosquitto::new("max_qos 1");
    broker.start().await;
    let client = Client::connect(opts(broker.port(), ProtocolVersion::V311).fail_fast(true))
        .await
        .unwrap();
    let mut events = client.events();
    let outcome = within("subscribe", client.subscribe("TEST", QoS::ExactlyOnce))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        SubscribeOutcome::Downgraded {
            requested: QoS::ExactlyOnce,
            granted: QoS::AtLeastOnce
        }
    );
    let ev = wait_event(&mut events, "downgrade event", |e| {
        matches!(e, ClientEvent::Downgraded { .. })
    })
    .await;
    assert_eq!(
        ev,
        ClientEvent::Downgraded {
            filter: "TEST".into(),
            requested: QoS::ExactlyOnce,
            granted: QoS::AtLeastOnce,
            restored: false
        }
    );
    assert_eq!(client.stats().downgrades, 1);

    broker.stop().await;
    broker.start().await;
    let ev = wait_event(&mut events, "downgrade at restore", |e| {
        matches!(e, ClientEvent::Downgraded { .. })
    })
    .await;
    assert!(
        matches!(
            ev,
            ClientEvent::Downgraded {
                restored: true,
                requested: QoS::ExactlyOnce,
                ..
            }
        ),
        "{ev:?}"
    );
    assert_eq!(client.stats().downgrades, 2);
    // The registry still asks for QoS 2: a broker that allows it later grants it.
    let subs = client.subscriptions().await.unwrap();
    assert_eq!(subs[0].options.qos, QoS::ExactlyOnce);
    client.disconnect().await;
}

/// A publish made while the broker is down waits in the offline queue and resolves (PUBCOMP)
/// once the broker is back.
async fn publish_awaited_across_broker_restart(mut broker: impl TestBroker) {
    broker.start().await;
    let client = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap();
    let mut events = client.events();
    broker.stop().await;
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;

    let mut q2 = Box::pin(client.publish_to("orders/1", QoS::ExactlyOnce, "order"));
    let mut q1 = Box::pin(client.publish_to("orders/2", QoS::AtLeastOnce, "order"));
    tokio::select! {
        biased;
        r = &mut q2 => panic!("resolved with the broker down: {r:?}"),
        r = &mut q1 => panic!("resolved with the broker down: {r:?}"),
        _ = std::future::ready(()) => {}
    }
    client.subscriptions().await.unwrap(); // both publishes are queued by now
    assert!(!client.is_connected());

    broker.start().await;
    let done = within("QoS 2 publish after restart", q2).await.unwrap();
    assert_eq!(done.qos, QoS::ExactlyOnce);
    assert!(done.reason_code.is_success());
    let done = within("QoS 1 publish after restart", q1).await.unwrap();
    assert_eq!(done.qos, QoS::AtLeastOnce);
    assert_eq!(client.stats().publish_acked, 2);
    client.disconnect().await;
}

#[tokio::test]
async fn mosquitto_publish_awaited_across_broker_restart() {
    publish_awaited_across_broker_restart(Mosquitto::new("")).await;
}

#[tokio::test]
async fn qosmos_publish_awaited_across_broker_restart() {
    publish_awaited_across_broker_restart(QosmosBroker::new()).await;
}

/// Routing by filter: every matching handler runs; the fallback takes the rest.
async fn routes_and_fallback(mut broker: impl TestBroker) {
    broker.start().await;
    let client = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, String)>(16);
    for (name, filter) in [
        ("plus", "orders/+"),
        ("hash", "orders/#"),
        ("exact", "orders/1"),
    ] {
        let tx = tx.clone();
        client.route(filter, move |m| {
            let tx = tx.clone();
            async move {
                tx.send((name.to_owned(), m.topic)).await.unwrap();
            }
        });
    }
    let fb = tx.clone();
    client.on_message(move |m| {
        let tx = fb.clone();
        async move {
            tx.send(("fallback".to_owned(), m.topic)).await.unwrap();
        }
    });
    within("subscribe", client.subscribe("#", QoS::AtLeastOnce))
        .await
        .unwrap();
    within(
        "publish",
        client.publish_to("orders/1", QoS::AtLeastOnce, "a"),
    )
    .await
    .unwrap();
    within("publish", client.publish_to("other", QoS::AtLeastOnce, "b"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(within("routed", rx.recv()).await.unwrap());
    }
    let names: Vec<_> = got.iter().map(|(n, t)| format!("{n}:{t}")).collect();
    assert_eq!(
        names,
        [
            "plus:orders/1",
            "hash:orders/1",
            "exact:orders/1",
            "fallback:other"
        ]
    );
    client.disconnect().await;
}

#[tokio::test]
async fn mosquitto_routes_and_fallback() {
    routes_and_fallback(Mosquitto::new("")).await;
}

#[tokio::test]
async fn qosmos_routes_and_fallback() {
    routes_and_fallback(QosmosBroker::new()).await;
}

/// Several app instances share `$share/web/jobs/+`: each message is handled by exactly one of
/// them, at QoS 2, and routes registered with the shared filter match the plain topics.
async fn shared_subscription_across_instances(mut broker: impl TestBroker) {
    broker.start().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, String)>(64);
    let mut instances = Vec::new();
    for i in 0..2 {
        let c = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
            .await
            .unwrap();
        let tx = tx.clone();
        c.route("$share/web/jobs/+", move |m| {
            let tx = tx.clone();
            async move {
                assert_eq!(m.qos, QoS::ExactlyOnce);
                tx.send((i, m.topic)).await.unwrap();
            }
        });
        let granted = within(
            "shared subscribe",
            c.subscribe("$share/web/jobs/+", QoS::ExactlyOnce),
        )
        .await
        .unwrap();
        assert_eq!(granted, SubscribeOutcome::Granted(QoS::ExactlyOnce));
        instances.push(c);
    }
    let publisher = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap();
    for n in 0..10 {
        within(
            "publish",
            publisher.publish_to(&format!("jobs/{n}"), QoS::ExactlyOnce, "job"),
        )
        .await
        .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let (_, topic) = within("shared delivery", rx.recv()).await.unwrap();
        assert!(seen.insert(topic.clone()), "{topic} handled twice");
    }
    assert_eq!(seen.len(), 10);
    for c in &instances {
        c.disconnect().await;
    }
    publisher.disconnect().await;
    // Nothing else arrived: every sender is gone once the clients are shut down.
    drop(instances);
    drop(tx);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn mosquitto_shared_subscription_across_instances() {
    shared_subscription_across_instances(Mosquitto::new("")).await;
}

#[tokio::test]
async fn qosmos_shared_subscription_across_instances() {
    shared_subscription_across_instances(QosmosBroker::new()).await;
}

/// The durable outbox: a message accepted while the broker is down, by a client that then goes
/// away, is delivered by the next client started on the same outbox file.
async fn outbox_survives_the_client(mut broker: impl TestBroker) {
    let dir = std::env::temp_dir().join(format!(
        "qosmos-client-outbox-{}-{}",
        std::process::id(),
        broker.port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("outbox.log");

    let first = Client::connect(
        opts(broker.port(), ProtocolVersion::V5)
            .durable_outbox(&path)
            .shutdown_timeout(std::time::Duration::ZERO),
    )
    .await
    .unwrap();
    let mut publish = Box::pin(first.publish_to("orders/9", QoS::ExactlyOnce, "kept"));
    tokio::select! {
        biased;
        r = &mut publish => panic!("resolved with no broker: {r:?}"),
        _ = std::future::ready(()) => {}
    }
    first.subscriptions().await.unwrap(); // the publish is on disk by now
    first.disconnect().await;
    assert_eq!(
        within("publish fails", publish).await,
        Err(ClientError::Closed)
    );

    broker.start().await;
    let subscriber = Client::connect(opts(broker.port(), ProtocolVersion::V5).fail_fast(true))
        .await
        .unwrap();
    let mut messages = subscriber.messages();
    within(
        "subscribe",
        subscriber.subscribe("orders/+", QoS::ExactlyOnce),
    )
    .await
    .unwrap();
    let second = Client::connect(
        opts(broker.port(), ProtocolVersion::V5)
            .durable_outbox(&path)
            .fail_fast(true),
    )
    .await
    .unwrap();
    assert_eq!(second.stats().republished, 1);
    let msg = within("the stored message", messages.recv()).await.unwrap();
    assert_eq!(
        (msg.topic.as_str(), &msg.payload[..]),
        ("orders/9", &b"kept"[..])
    );
    assert_eq!(msg.qos, QoS::ExactlyOnce);
    drop(msg);
    second.disconnect().await; // waits for PUBCOMP: the outbox is then empty
    subscriber.disconnect().await;

    let third = Client::connect(opts(broker.port(), ProtocolVersion::V5).durable_outbox(&path))
        .await
        .unwrap();
    assert_eq!(
        third.stats().republished,
        0,
        "acknowledged messages are not sent again"
    );
    third.disconnect().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn mosquitto_outbox_survives_the_client() {
    outbox_survives_the_client(Mosquitto::new("")).await;
}

#[tokio::test]
async fn qosmos_outbox_survives_the_client() {
    outbox_survives_the_client(QosmosBroker::new()).await;
}
