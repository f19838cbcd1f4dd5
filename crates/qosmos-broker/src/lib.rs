//! The qosmos MQTT broker: MQTT 3.1.1 and 5.0, embeddable, observable.
//!
//! `qosmos-broker` is the broker `qosmos serve` embeds so that one machine needs nothing else,
//! and the one `qosmos broker` runs alone. It is a thin shell over `qosmos-mqtt`: a tokio task
//! per busy connection decodes packets and drives the shared QoS state machines
//! ([`qosmos_mqtt::state`]); a subscription index routes each message to its sessions.
//!
//! An idle connection has no task: whenever it did nothing for a keep-alive sweep period
//! (0.5–1 s), and from 256 connections up right after its CONNACK if nothing else came, it
//! is parked, its state in a slab and its socket in one epoll set (mio's) that one thread
//! watches for the whole broker. It is resumed, its task spawned again, when its socket is
//! readable or closed, or when a message is routed to it, it is taken over, its keep alive
//! is due or the broker shuts down. That is how an idle connection costs about 0.9 kB of the
//! broker's memory at 10,000 of them (Mosquitto: 0.7; BENCHMARKS.md, "Memory per idle
//! connection"); `qosmos_broker_connections_parked` counts them. What is kept longer than
//! its packet (a subscription's filter, a will, a topic alias, a retained message) is copied
//! out of the read buffer, which a slice would keep allocated.
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
//! # Durability
//! With [`Config::data_dir`] the broker keeps a write-ahead log ([`store`]) and acknowledges
//! only what it holds: PUBACK / PUBREC after the message and the deliveries it owes to
//! persistent sessions are durable; PUBCOMP after the publisher's released packet id is; SUBACK
//! and UNSUBACK after the subscription change is. Towards a subscriber, a QoS 2 PUBLISH goes out
//! only once its packet id is recorded, and PUBREL once the PUBREC is, so that after a crash the
//! broker resends the same packet id with DUP and the subscriber's duplicate detection holds.
//! When the subscriber is connected with room in its inflight window and nothing queued, the
//! packet id is given as the message is routed and recorded in the same record as the message,
//! so one sync covers both and the PUBLISH goes out as soon as the publisher's record is durable;
//! otherwise the subscriber's connection records it when the PUBLISH leaves the queue (a second
//! sync).
//! Every socket read is one batch with one append, written as one record (each client's
//! delivery and release steps packed together, the whole recovered all or nothing), and
//! concurrent connections share each `fdatasync` (group commit). Completed deliveries
//! (`Delivered`), whose loss costs only a resend, wait up to 2 ms to ride with the next append. A subscriber never sees a message whose publisher was not
//! acknowledged, so a publisher's resend after a crash cannot make a QoS 2 duplicate. At start
//! the log is replayed: persistent sessions (disconnected, their expiry counted from the
//! start), their subscriptions, owed deliveries at every QoS 2 stage, the QoS 2 packet ids
//! awaiting PUBREL, retained messages and delayed wills come back. The log is compacted once it
//! is larger than [`Config::compact_min_bytes`] and four times its last snapshot.
//!
//! What each [`store::FsyncPolicy`] loses (`qosmos broker --fsync`): on SIGKILL, nothing
//! acknowledged under any policy (the data is in the OS page cache); on power loss or a kernel
//! crash, nothing under `Always` and `Batch`, and possibly the last acknowledged messages
//! under `Never`.
//!
//! What it costs (`bench/compare.sh --durable`, BENCHMARKS.md, one shared 2-core machine, same
//! run, averaged over 16 runs): QoS 2 with persistent sessions at 0.47–0.55 of the in-memory
//! broker's throughput with `Always` and 0.58–0.63 with `Never` (single runs vary from 0.3 to
//! over 1), QoS 1 at 0.52–0.57 and 0.62–0.71, 3–15× Mosquitto with `persistence true`; a QoS 2
//! delivery's latency at 5,000 msgs/s, median p50 0.63 ms with `Always` (0.27 ms in memory).
//! Later, 16 runs: QoS 2 `Always` fan-in 0.47 (median 0.49, single runs 0.29–0.63), pairs 0.59
//! (0.58). In a QoS 2 fan-in the durable broker spent about 1.75× the CPU of the in-memory
//! one, a third of the difference in a mirror of the durable state kept for compaction. That
//! mirror is gone (session 11): a compaction replays the log itself on a thread of its own,
//! and the durable broker's CPU per run fell by a sixth (QoS 2 `Always` throughput +9 % fan-in,
//! +13 % pairs, 24 alternated rounds). The rest is in building, packing and encoding records,
//! handing appends to the writer and back, and the lock that orders appends, held while a
//! publisher's read is handled (subscribers' acknowledgements are handled outside it, and
//! records known before it is taken are encoded before).
//!
//! # What it does not do (yet)
//! - Durability covers sessions that outlive their connection (3.1.1 clean session false, 5.0
//!   session expiry above 0): a clean session's state ends with its connection anyway, so its
//!   deliveries and QoS 2 packet ids are not logged; QoS 0 messages are not logged except as
//!   retained messages. A QoS 1 delivery is logged without its packet id, so after a crash it
//!   is sent again with a new one (at least once, as QoS 1 allows).
//! - The live durable state (sessions, queued messages) must fit in memory: the log is
//!   replayed into memory at start, and again, on a thread of its own, by each compaction.
//! - A message routed to a session at the moment that session is replaced by a clean start
//!   may, after a crash, be owed to the new session.
//! - Expiry is checked against the clock only in memory: a retained message that expired stays
//!   in the log (and in compactions) until its topic is set again, and is skipped at start; a
//!   session's expiry counts from the last start, not from its disconnection.
//! - Authentication and authorization (every client is allowed; enhanced authentication is
//!   refused), TLS and WebSocket listeners, outgoing topic aliases (allowed by the
//!   specification: the broker never needs to send them), clustering (use EMQX, VerneMQ or
//!   HiveMQ past one machine).

mod admin;
mod config;
mod connection;
mod durable;
mod hub;
mod metrics;
mod park;
mod server;
mod session;
pub mod store;
mod sys;

pub use admin::{BrokerHandle, ClientInfo, SubscriptionInfo};
pub use config::{Config, Limits};
pub use durable::OpenError;
pub use metrics::Metrics;
pub use server::{Broker, BrokerError};
