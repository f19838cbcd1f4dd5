//! The seed's scenario (`seed/000_66fc3e2343d1dbdd.txt`): a Flask app with Flask-MQTT calls
//! `mqtt.subscribe(topic="TEST", qos=2)`, and the broker's dashboard must show what was really
//! granted, before and after the broker restarts and the app reconnects.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Script, TestBroker, http_get, limits, mosquitto_pub, paho_spawn, spawn_script};
use serde_json::{Value, json};

/// Every subscription of `client`, as (topic, qos), from the in-process handle.
fn subscriptions_of(b: &TestBroker, client: &str) -> Vec<(String, u8)> {
    b.handle
        .subscriptions()
        .into_iter()
        .filter(|s| s.client_id == client)
        .map(|s| (s.topic, s.qos))
        .collect()
}

/// The same over HTTP: `GET /api/broker/subscriptions`.
async fn http_subscriptions_of(b: &TestBroker, client: &str) -> Vec<(String, u64)> {
    let (status, body) = http_get(b.http.unwrap(), "/api/broker/subscriptions").await;
    assert_eq!(status, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["client_id"] == client)
        .map(|s| {
            (
                s["topic"].as_str().unwrap().to_string(),
                s["qos"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The rest of the admin API answers too: clients, metrics, health.
async fn admin_api_is_served(b: &TestBroker) {
    let http = b.http.unwrap();
    let (status, body) = http_get(http, "/api/broker/clients").await;
    assert_eq!(status, 200);
    let clients: Value = serde_json::from_str(&body).unwrap();
    let flask = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "flask-seed")
        .unwrap_or_else(|| panic!("flask-seed not in {body}"));
    assert_eq!(flask["connected"], true);
    assert_eq!(flask["subscriptions"], 1);
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("\nqosmos_broker_clients_connected 1\n"),
        "{body}"
    );
    assert_eq!(http_get(http, "/healthz").await.0, 200);
}

/// Publishes one order at QoS 2 with mosquitto_pub and waits until the Flask app got it.
async fn order_reaches_flask(b: &TestBroker, app: &mut Script, payload: &str) {
    mosquitto_pub(b.port(), "mqttv311", "TEST", 2, payload).await;
    let m = app.wait_event("message").await;
    assert_eq!(
        (&m["topic"], &m["payload"]),
        (&json!("TEST"), &json!(payload))
    );
    assert_eq!(m["qos"], 2, "delivered at QoS 2: {m}");
}

/// The seed's app against our broker, across a broker restart.
///
/// Observed with Flask-MQTT 1.3.0 (PyPI; paho-mqtt 2.2.0, Flask 3.1.3): Flask-MQTT now keeps
/// each topic with its QoS (`Mqtt.topics: Dict[str, TopicQos]`, the fix the seed's author
/// contributed) and its `_handle_connect` re-subscribes every topic *with its QoS* on each
/// CONNACK. So the broker sees SUBSCRIBE TEST at QoS 2 from the explicit call (plus once more
/// if the CONNACK is handled after that call) and, after the restart, again at QoS 2 from
/// Flask-MQTT's automatic re-subscription.
/// The admin API shows exactly what was granted: one subscription, TEST at QoS 2, before and
/// after. (The seed's version, 2018, re-subscribed with the default QoS 0; that case is shown
/// by `admin_api_shows_a_downgrade_as_granted` below, which a re-subscription at QoS 0 would
/// hit.) The script prints the versions it ran with; this test asserts the behaviour, so a
/// Flask-MQTT release that regressed would fail it.
#[tokio::test]
async fn flask_mqtt_keeps_qos_2_across_broker_restart() {
    let localhost = "127.0.0.1:0".parse().unwrap();
    let b = TestBroker::start_on(localhost, Some(localhost), limits()).await;
    let (mqtt_addr, http_addr) = (b.addr, b.http.unwrap());
    let mut app = spawn_script("flask_app.py", &[b.port().to_string()]);
    let versions = app.wait_event("versions").await;
    eprintln!("seed scenario with {versions}");
    let called = app.wait_event("subscribe_called").await;
    assert_eq!(
        called["topics"],
        json!({"TEST": 2}),
        "Flask-MQTT's own record"
    );

    b.wait_subscription(Some("flask-seed"), "TEST", 2).await;
    assert_eq!(subscriptions_of(&b, "flask-seed"), [("TEST".into(), 2)]);
    assert_eq!(
        http_subscriptions_of(&b, "flask-seed").await,
        [("TEST".into(), 2)]
    );
    order_reaches_flask(&b, &mut app, "order-1").await;
    admin_api_is_served(&b).await;

    // Restart the broker on the same ports. It keeps no state across the restart (memory
    // only), so the app must subscribe again on its own.
    b.stop().await;
    app.wait_event("disconnected").await;
    let b = TestBroker::start_on(mqtt_addr, Some(http_addr), limits()).await;
    // The first "connected" may come before or after "subscribe_called"; wait for the second.
    while app.wait_event("connected").await["n"] != 2 {}
    b.wait_subscription(Some("flask-seed"), "TEST", 2).await;
    assert_eq!(subscriptions_of(&b, "flask-seed"), [("TEST".into(), 2)]);
    assert_eq!(
        http_subscriptions_of(&b, "flask-seed").await,
        [("TEST".into(), 2)]
    );
    order_reaches_flask(&b, &mut app, "order-2").await;
    app.finish().await;
}

/// The dashboard never hides a downgrade: a client that subscribes at QoS 2 and then again at
/// QoS 0 (what the seed's Flask-MQTT did on every connect) is listed at QoS 0, and a QoS 2
/// message then reaches it at QoS 0.
#[tokio::test]
async fn admin_api_shows_a_downgrade_as_granted() {
    let localhost = "127.0.0.1:0".parse().unwrap();
    let b = TestBroker::start_on(localhost, Some(localhost), limits()).await;
    let mut s = paho_spawn(json!({"port": b.port(), "version": 311,
    "client_id": "seed-2018",
    "steps": [
        {"sub": [["TEST", 2]]}, {"sub": [["TEST", 0]]},
        {"event": "resubscribed"}, {"wait_line": true},
        {"expect": 1}, {"disconnect": null}
    ]}));
    s.wait_event("resubscribed").await;
    assert_eq!(subscriptions_of(&b, "seed-2018"), [("TEST".into(), 0)]);
    assert_eq!(
        http_subscriptions_of(&b, "seed-2018").await,
        [("TEST".into(), 0)]
    );
    s.send_line().await;
    mosquitto_pub(b.port(), "mqttv311", "TEST", 2, "order").await;
    let r = s.finish().await;
    assert_eq!(r["steps"][0]["granted"], json!([2]));
    assert_eq!(r["steps"][1]["granted"], json!([0]));
    assert_eq!(r["messages"][0]["qos"], 0);
}
