//! The qosmos MQTT broker: MQTT 3.1.1 and 5.0, embeddable, observable.
//!
//! `qosmos-broker` is the broker `qosmos serve` embeds so that one machine needs nothing else,
//! and the one `qosmos broker` runs alone. It is a thin shell over `qosmos-mqtt`: one tokio task
//! per connection decodes packets and drives the shared QoS state machines
//! ([`qosmos_mqtt::state`]); a subscription index routes each message to its sessions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qosmos_broker::BrokerError> {
//! use qosmos_broker::{Broker, Config};
//! let mut config = Config::default();
//! config.mqtt_addr = "127.0.0.1:0".parse().unwrap();
//! let broker = Broker::bind(config).await?;
//! println!("MQTT on {}", broker.mqtt_addr());
//! broker.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! # What it does
//! Sessions (clean and persistent, 5.0 session expiry, takeover), QoS 0/1/2 both ways with
//! delivery QoS = min(published, granted), redelivery with DUP on resume, retained messages,
//! wills (with 5.0 will delay), `$SYS/` statistics, 5.0 reason codes, Receive Maximum and Maximum
//! Packet Size both ways, incoming topic aliases, subscription options and identifiers, shared
//! subscriptions (`$share/{group}/{filter}`, round robin preferring online members), limits that
//! count what they drop ([`Limits`], [`Metrics`]), and an admin HTTP API ([`BrokerHandle`]).
//!
//! # What it does not do (yet)
//! Durable storage (`data_dir` is accepted but state is kept in memory only), authentication
//! and authorization (every client is allowed; enhanced authentication is refused), TLS and
//! WebSocket listeners, outgoing topic aliases (allowed by the specification: the broker never
//! needs to send them), clustering (use EMQX, VerneMQ or HiveMQ past one machine).

mod admin;
mod config;
mod connection;
mod durable;
mod hub;
mod metrics;
mod server;
mod session;
pub mod store;
mod sys;

pub use admin::{BrokerHandle, ClientInfo, SubscriptionInfo};
pub use config::{Config, Limits};
pub use durable::OpenError;
pub use metrics::Metrics;
pub use server::{Broker, BrokerError};
