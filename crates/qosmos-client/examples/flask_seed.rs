//! The seed's Flask snippet, in Rust: an axum app that subscribes to "TEST" at QoS 2 and
//! publishes on POST.
//!
//! ```python
//! app.config['MQTT_BROKER_URL'] = 'localhost'
//! app.config['MQTT_BROKER_PORT'] = 1993
//! app.config['MQTT_KEEPALIVE'] = 30
//! mqtt = Mqtt(app)
//! mqtt.subscribe(topic="TEST", qos=2)
//! app.run()
//! ```
//!
//! Run it with the same keys in the environment:
//!
//! ```sh
//! MQTT_BROKER_URL=localhost MQTT_BROKER_PORT=1883 MQTT_KEEPALIVE=30 \
//!     cargo run -p qosmos-client --features axum --example flask_seed
//! curl -X POST --data 'order 1' http://127.0.0.1:5000/publish
//! curl http://127.0.0.1:5000/subscriptions
//! ```
//!
//! Unlike the Flask version, the subscription stays at QoS 2 across broker restarts (and a
//! downgrade would be reported), the POST answers only after the broker's PUBCOMP, and Ctrl-C
//! waits for acknowledgements before leaving.

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use qosmos_client::mqtt::QoS;
use qosmos_client::{Client, MqttConfig};

#[derive(Clone)]
struct AppState {
    mqtt: Client,
}

impl FromRef<AppState> for Client {
    fn from_ref(state: &AppState) -> Client {
        state.mqtt.clone()
    }
}

/// `mqtt.publish("TEST", body, qos=2)`, answered once the broker has it (PUBCOMP).
async fn publish(mqtt: Client, body: Bytes) -> (StatusCode, String) {
    match mqtt.publish_to("TEST", QoS::ExactlyOnce, body).await {
        Ok(done) => (StatusCode::OK, format!("delivered: {}\n", done.reason_code)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// What the broker granted, per subscription.
async fn subscriptions(State(state): State<AppState>) -> String {
    match state.mqtt.subscriptions().await {
        Ok(subs) => subs
            .iter()
            .map(|s| {
                format!(
                    "{} asked QoS {} -> {:?}\n",
                    s.filter, s.options.qos, s.state
                )
            })
            .collect(),
        Err(e) => format!("{e}\n"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Mqtt(app): the same MQTT_* keys as Flask-MQTT.
    let mqtt = MqttConfig::from_env_prefixed("MQTT_")?.connect().await?;

    // @mqtt.on_topic("TEST")
    mqtt.route("TEST", |msg| async move {
        println!(
            "TEST at QoS {}: {}",
            msg.qos,
            String::from_utf8_lossy(&msg.payload)
        );
    });
    // @mqtt.on_subscribe() / on_connect(): events, downgrades included.
    let mut events = mqtt.events();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            println!("mqtt event: {ev:?}");
        }
    });
    // mqtt.subscribe(topic="TEST", qos=2): not awaited, so the app starts even if the broker
    // is down; it is sent (and kept at QoS 2) whenever a connection is up.
    let sub = mqtt.clone();
    tokio::spawn(async move {
        match sub.subscribe("TEST", QoS::ExactlyOnce).await {
            Ok(outcome) => println!("subscribed to TEST: {outcome:?}"),
            Err(e) => eprintln!("subscribe to TEST failed: {e}"),
        }
    });

    let app = Router::new()
        .route("/publish", post(publish))
        .route("/subscriptions", get(subscriptions))
        .with_state(AppState { mqtt: mqtt.clone() });
    let addr = std::env::var("HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:5000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Wait for inflight acknowledgements, then DISCONNECT.
    mqtt.shutdown().await;
    Ok(())
}
