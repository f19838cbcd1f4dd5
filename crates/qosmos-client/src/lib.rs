//! An async MQTT 3.1.1 / 5.0 client for tokio that keeps its promises: nothing lost, nothing
//! handled twice, no QoS silently downgraded.
//!
//! - One task owns the socket and the protocol state (`qosmos-mqtt`'s sans-I/O state machines);
//!   the application holds cloneable [`Client`] handles.
//! - **Subscriptions are kept with all their options.** The registry remembers each filter with
//!   its QoS and 5.0 options. Whenever the broker has no session for us (CONNACK session
//!   present = 0) every subscription is sent again exactly as asked for; when it has one,
//!   nothing is resubscribed. A subscribe made while offline is sent on connect.
//! - **Granted QoS is checked**, at the first subscribe and at every restore:
//!   [`SubscribeOutcome::Downgraded`], a warning, a counter, a [`ClientEvent::Downgraded`].
//! - **Publishing is awaitable**: [`Client::publish`] resolves on PUBACK / PUBCOMP, with the
//!   reason code; a refusal is an error. Offline, messages wait in a bounded queue (a full queue
//!   is an error to the caller, never a silent drop) and unacknowledged ones are sent again.
//! - **Received messages are handed over once** (QoS 2 duplicates are recognised) to handlers
//!   routed by topic filter ([`Client::route`]) or a [`Messages`] receiver, and acknowledged
//!   only after the handler returns. Channels are bounded: a slow handler stops the client
//!   reading from the socket instead of growing a buffer.
//! - Reconnects with exponential backoff and jitter (100 ms → 5 s by default).
//!
//! # What it does not do
//!
//! No TLS or WebSocket (`mqtts://`, `ws://`) yet, no enhanced authentication (AUTH), no topic
//! aliases of its own. The offline queue lives in memory unless
//! [`ClientOptions::durable_outbox`] is set; without it, messages not yet acknowledged are lost
//! if the process dies (their publishers were not told "done"). With it, they are sent again
//! by the next client on the same file, at least once (not exactly once) across the restart.
//!
//! # Coming from Flask-MQTT
//!
//! The bug that started qosmos: Flask-MQTT kept the topics you subscribed to but not their QoS,
//! and on every (re)connect subscribed them again at QoS 0. Here is how its API maps:
//!
//! | Flask-MQTT | qosmos-client |
//! |---|---|
//! | `app.config['MQTT_BROKER_URL']`, `MQTT_BROKER_PORT`, … | `MqttConfig::from_env_prefixed("MQTT_")` (feature `axum`), or [`ClientOptions`] / [`ClientOptions::from_url`] |
//! | `mqtt = Mqtt(app)` | `let mqtt = Client::connect(opts).await?;` then put `mqtt` in the axum state (it is `Clone`; use `State<Client>` or `FromRef`) |
//! | `mqtt.subscribe("TEST", qos=2)` | `mqtt.subscribe("TEST", QoS::ExactlyOnce).await?` returns the granted QoS; kept with its QoS for every reconnect |
//! | `mqtt.unsubscribe("TEST")` | `mqtt.unsubscribe("TEST").await?` (by filter string) |
//! | `mqtt.unsubscribe_all()` | `for s in mqtt.subscriptions().await? { mqtt.unsubscribe(&s.filter).await? }` |
//! | `mqtt.publish("TEST", payload, qos=2)` | `mqtt.publish_to("TEST", QoS::ExactlyOnce, payload).await?`, which returns after PUBCOMP |
//! | `@mqtt.on_connect()` / `@mqtt.on_disconnect()` | `mqtt.events()`: [`ClientEvent::Connected`] `{ session_present }`, [`ClientEvent::Disconnected`] |
//! | `@mqtt.on_message()` | `mqtt.on_message(\|msg\| async move { … })` (messages no route takes), or `mqtt.messages()` |
//! | `@mqtt.on_topic("TEST")` | `mqtt.route("TEST", \|msg\| async move { … })`, wildcards allowed |
//! | `@mqtt.on_subscribe()` | [`ClientEvent::Subscribed`] (with the granted QoS), [`ClientEvent::Downgraded`], [`ClientEvent::SubscribeRefused`] |
//! | `@mqtt.on_unsubscribe()` | `mqtt.unsubscribe(..).await` returns after UNSUBACK |
//! | `@mqtt.on_log()` | `tracing`: install any subscriber (`RUST_LOG`) |
//! | `MQTT_LAST_WILL_TOPIC` … | [`ClientOptions::will`] with a [`Will`] |
//!
//! Differences worth knowing: a subscribe made before the connection is up is not lost; the
//! client reconnects by itself; handlers run one message at a time, and the message is
//! acknowledged (PUBACK / PUBREC) when they return; shutdown ([`Client::disconnect`]) waits
//! for acknowledgements.

#[cfg(feature = "axum")]
mod axum_support;
mod backoff;
mod client;
mod error;
mod event;
mod message;
mod options;
mod outbox;
mod registry;
mod router;
mod task;

#[cfg(feature = "axum")]
pub use axum_support::MqttConfig;
pub use client::Client;
pub use error::{ClientError, OptionsError};
pub use event::{ClientEvent, ClientStats};
pub use message::{AckHandle, Message};
pub use options::{ClientOptions, Will};
pub use registry::{SubscribeOptions, SubscribeOutcome, SubscriptionInfo, SubscriptionState};
pub use router::Messages;
pub use task::PublishOutcome;

/// The protocol crate, re-exported for its types (`QoS`, `Publish`, `ProtocolVersion`, …).
pub use qosmos_mqtt as mqtt;
