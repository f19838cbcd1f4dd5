//! `qosmos-orders`: the order-dispatch service behind `qosmos serve`.
//!
//! Web services `POST` orders; the service stores each one durably and answers `201`
//! only after the commit is on disk; a dispatcher then pushes it to the store over MQTT
//! at QoS 2 on `orders/{store_id}`, and the store's ack on `acks/{store_id}` closes it.
//! The HTTP contract is `PRODUCT.md`; the same API is described as OpenAPI 3.1 at
//! `GET /api/openapi.json`.
//!
//! # What is here
//! - [`model`]: the order JSON of the contract and strict validation of request bodies.
//! - [`store`]: the order store: SQLite (WAL, `synchronous=FULL`), embedded migrations,
//!   idempotency keys, the status lifecycle with a microsecond history, the
//!   dispatcher's queries ([`store::OrderStore::due_for_dispatch`],
//!   [`store::OrderStore::pending_by_store`]).
//! - [`http`]: the axum router ([`http::router`]) and [`http::serve`].
//! - [`dispatch`]: the traits MQTT plugs into, [`dispatch::Dispatcher`] (told of each
//!   committed order) and [`dispatch::StoreDirectory`] (who is online, at what QoS).
//! - [`id`], [`time`]: time-ordered order ids and microsecond RFC 3339 timestamps.
//!
//! # Example
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use qosmos_orders::{http, store::OrderStore};
//!
//! let store = OrderStore::open("qosmos-data/orders.db").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! http::serve(listener, http::AppState::new(store), std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! # What it does not do yet
//! - **MQTT dispatch**: no [`dispatch::Dispatcher`] publishes yet; with the default
//!   [`dispatch::NoDispatcher`] orders stay `received`. The one built on
//!   `qosmos-client` will publish at QoS 2 and call
//!   [`store::OrderStore::mark_dispatched`] on PUBCOMP, and rescan
//!   [`store::OrderStore::due_for_dispatch`] for redispatch after the ack timeout.
//! - **Ack consumer**: nothing subscribes to `acks/+` yet; the store side is ready
//!   ([`store::OrderStore::record_ack`], [`model::Ack`]).
//! - **Store agent** (`qosmos store`): not here yet.
//! - **Dashboard**: `GET /` is a placeholder page; `GET /api/stores` lists only stores
//!   with pending orders until a real [`dispatch::StoreDirectory`] is wired in.
//! - **PostgreSQL**: SQLite only. The queries use `$n` placeholders, integer
//!   microsecond times and TEXT JSON so they port, but write transactions use SQLite's
//!   `BEGIN IMMEDIATE` and the pool is `SqlitePool`; a `postgres` feature is future work.
//! - **Idempotency keys** are kept forever (no expiry yet) and are global, not
//!   per client.
//! - `/metrics` and the `/api/broker/*` routes belong to the broker and the binary.

pub mod acks;
pub mod agent;
pub mod directory;
pub mod dispatch;
pub mod dispatcher;
pub mod http;
pub mod id;
pub mod journal;
pub mod metrics;
pub mod model;
pub mod service;
pub mod store;
pub mod time;
