//! The axum integration: configuration from Flask-MQTT's keys, the handle in axum state,
//! publish on POST, graceful shutdown.
#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use axum::Router;
use axum::extract::FromRef;
use axum::routing::post;
use bytes::Bytes;
use common::{Mosquitto, within};
use qosmos_client::mqtt::QoS;
use qosmos_client::{Client, ClientError, MqttConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
struct AppState {
    mqtt: Client,
}

impl FromRef<AppState> for Client {
    fn from_ref(s: &AppState) -> Client {
        s.mqtt.clone()
    }
}

async fn publish(mqtt: Client, body: Bytes) -> String {
    match mqtt.publish_to("TEST", QoS::ExactlyOnce, body).await {
        Ok(done) => format!("ok {}", done.qos),
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test]
async fn flask_style_app_publishes_on_post() {
    let mut broker = Mosquitto::new("");
    broker.start().await;
    let port = broker.port.to_string();
    let env = [
        ("MQTT_BROKER_URL", "127.0.0.1"),
        ("MQTT_BROKER_PORT", port.as_str()),
        ("MQTT_KEEPALIVE", "30"),
        ("MQTT_PROTOCOL_VERSION", "5"),
        ("MQTT_CLIENT_ID", "flask-seed-web"),
    ];
    let lookup = |k: &str| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    };
    let mqtt = MqttConfig::from_lookup("MQTT_", lookup)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(mqtt.client_id(), "flask-seed-web");

    // The store side: subscribed to TEST at QoS 2.
    let store = MqttConfig::from_lookup("MQTT_", |k| match k {
        "MQTT_CLIENT_ID" => Some("flask-seed-store".to_owned()),
        _ => lookup(k),
    })
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut messages = store.messages();
    within("subscribe", store.subscribe("TEST", QoS::ExactlyOnce))
        .await
        .unwrap();

    let app = Router::new()
        .route("/publish", post(publish))
        .with_state(AppState { mqtt: mqtt.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    let body = "order-1";
    s.write_all(
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    within("HTTP response", s.read_to_string(&mut response))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok 2"), "{response}");

    let msg = within("message", messages.recv()).await.unwrap();
    assert_eq!(
        (msg.topic.as_str(), &msg.payload[..]),
        ("TEST", &b"order-1"[..])
    );
    assert_eq!(msg.qos, QoS::ExactlyOnce);
    // Handled: dropping it acknowledges it (PUBREC), which the shutdown below waits for.
    drop(msg);

    mqtt.shutdown().await;
    store.shutdown().await;
    assert_eq!(
        mqtt.publish_to("TEST", QoS::AtLeastOnce, "late").await,
        Err(ClientError::Closed)
    );
}
