//! `qosmos-orders`: the order-dispatch service behind `qosmos serve`.
//!
//! Web services `POST` orders; the service stores each one durably and answers `201`
//! only after the commit is on disk; a dispatcher then pushes it to the store over MQTT
//! at QoS 2 on `orders/{store_id}`, and the store's ack on `acks/{store_id}` closes it.
//! The store agent on the other side ([`agent`]) handles each order exactly once.
//! The HTTP contract is `PRODUCT.md`; the same API is described as OpenAPI 3.1 at
//! `GET /api/openapi.json`.
//!
//! # One-minute walkthrough
//! Nothing to install but Rust: `serve` embeds the MQTT broker and SQLite.
//! ```text
//! # terminal 1: the service (HTTP on 127.0.0.1:8080, MQTT on 127.0.0.1:1883, ./qosmos-data)
//! cargo run --release -- serve
//!
//! # terminal 2: a store agent; each order it receives is printed as one JSON line
//! cargo run --release -- store --store-id store-1 --data-dir ./store-1
//!
//! # terminal 3: an order, retried safely with the same Idempotency-Key
//! curl -s -X POST localhost:8080/api/orders -H 'Idempotency-Key: demo-1' \
//!      -d '{"store_id":"store-1","items":[{"sku":"latte","qty":2}],"note":"oat milk"}'
//! # -> 201 {"id":"01…","store_id":"store-1",…,"status":"received"}
//! curl -s localhost:8080/api/orders/01…     # "status":"accepted", with its history:
//! #    received -> dispatched (PUBCOMP from the broker) -> accepted (the store's ack)
//! curl -s localhost:8080/api/stores          # store-1 online, orders/store-1 at QoS 2
//! curl -s localhost:8080/api/broker/subscriptions   # the QoS the broker granted
//! ```
//! Kill the store agent (even with `kill -9`) and start it again: orders posted meanwhile
//! arrive when it is back, and none is printed twice. `--exec ./decide.sh` runs a command
//! per order instead (exit 0 accepts; otherwise its stderr is the rejection reason).
//!
//! # What is here
//! - [`model`]: the order JSON of the contract and strict validation of request bodies.
//! - [`store`]: the order store: SQLite (WAL, `synchronous=FULL`), one writer thread
//!   that commits every write waiting in one transaction (group commit) and a thread
//!   beside it that checkpoints the WAL (never inside a commit), embedded migrations,
//!   idempotency keys, the status lifecycle with a microsecond history, the
//!   dispatcher's queries ([`store::OrderStore::due_for_dispatch`], with a redispatch
//!   wait that doubles per attempt, and [`store::OrderStore::pending_by_store`]).
//! - [`http`]: the axum router ([`http::router`]) and [`http::serve`], `/metrics`
//!   included.
//! - [`events`]: `GET /api/events`, the live server-sent events behind the dashboard:
//!   every order status change (read from the database's change feed by one shared
//!   poller, resumable with `Last-Event-ID`) and the stores whenever they change.
//! - [`dispatcher`]: the outbox dispatcher: QoS 2 publishes of `orders/{store_id}`
//!   through `qosmos-client`, `dispatched` on PUBCOMP, fed each new order by the store as
//!   it is committed ([`store::OrderStore::created_orders`]), scanning
//!   for orders a restart left `received` and for acks overdue, and, when a store comes
//!   online (seen in the embedded broker's sessions), sending its unacknowledged orders
//!   again at once (the broker dropped those published while nobody was subscribed); a
//!   bounded window of publishes in flight.
//! - [`acks`]: the ack consumer on `acks/+` (`$share/qosmos/acks/+` under MQTT 5), and
//!   [`acks::AckPresence`], the store directory when the broker is external.
//! - [`directory`]: the store directory from the embedded broker's sessions.
//! - [`service`]: all of the above wired over one MQTT client.
//! - [`agent`] and [`journal`]: the store agent (`qosmos store`) and its durable record of
//!   the orders it handled.
//! - [`metrics`]: the service's counters (`qosmos_orders_*`).
//! - [`dispatch`]: the traits MQTT plugs into, [`dispatch::Dispatcher`] (told of each
//!   committed order) and [`dispatch::StoreDirectory`] (who is online, at what QoS).
//! - [`id`], [`time`]: time-ordered order ids and microsecond RFC 3339 timestamps.
//!
//! # Exactly once, and where it is only at most once
//! The service publishes at least once (again after a restart, again when an ack is
//! overdue); the agent makes it exactly once by its journal, written and synced before it
//! acknowledges (one sync for the orders waiting together), and written before it prints: a SIGKILL between those two `write` calls
//! loses that one order's line rather than risk printing it twice (see [`agent`]). An
//! `--exec` command interrupted by a crash is not run again: the order is rejected with a
//! reason saying so.
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
//! - **Dashboard**: `GET /` shows stores (online, subscriptions with the granted QoS, below
//!   QoS 2 flagged in red), the broker's subscriptions and the latest orders, live: it
//!   loads the API once, then applies the server-sent events of `GET /api/events`
//!   ([`events`]). It shows the latest 50 orders only (no paging or search), and the
//!   broker's subscriptions are re-read when the stores change rather than streamed.
//! - **Store directory with an external broker** (`serve --broker`): the broker's sessions
//!   are not visible, so a store is listed online when an ack came from it in the last
//!   five minutes, with no subscriptions; pending counts are exact.
//! - **Embedded broker durability**: `qosmos-broker` keeps its state in memory for now
//!   (its `data_dir` is `{--data-dir}/broker`), so a `serve` restart loses the broker's
//!   queues; nothing is lost for good, because orders not acknowledged are dispatched
//!   again after the ack timeout.
//! - **PostgreSQL**: SQLite only. The queries use `$n` placeholders, integer
//!   microsecond times and TEXT JSON so they port (the redispatch wait uses `<<` and
//!   `MIN`/`MAX`, which become `<<` and `LEAST`/`GREATEST`), but write transactions use
//!   SQLite's `BEGIN IMMEDIATE` and the pool is `SqlitePool`.
//! - **Idempotency keys** are kept forever (no expiry yet) and are global, not
//!   per client. The agent's journal is never compacted.
//! - **Throughput**: the benchmark against the seed's Flask-MQTT stack is
//!   `bench/orders/run.sh` (results and the per-stage breakdown in
//!   `bench/orders/README.md`). p99 under 10 ms at 1,000 orders/s holds on an unloaded
//!   2-core machine, on disk; 20× the seed's orders/s is not reached (7.7–10.3× on 2
//!   shared cores).

/// The `tracing` target of the per-order stage events (`DEBUG`, off by default): one event
/// per step of an order's way, each with `order_id` and `stage`, so that the time between
/// steps can be measured from the logs of `qosmos serve` and `qosmos store`
/// (`RUST_LOG=info,qosmos_orders::stage=debug`; `bench/orders/stages.py` joins them).
/// The stages, in order: `committed` (serve: the order's commit returned, the HTTP handler
/// answers), `publish` (serve: the dispatcher starts the QoS 2 PUBLISH), `order_in` (store:
/// the order arrived), `synced` (store: its journal line is on disk), `ack_in` (serve: the
/// ack arrived), `pubcomp` (serve: the order's PUBCOMP arrived), `ack_committed` (serve:
/// the ack's commit returned), `ack_pubcomp` (store: its ack's PUBCOMP arrived).
pub const STAGE_TARGET: &str = "qosmos_orders::stage";

pub mod acks;
pub mod agent;
pub mod directory;
pub mod dispatch;
pub mod dispatcher;
pub mod events;
pub mod http;
pub mod id;
pub mod journal;
pub mod metrics;
pub mod model;
pub mod service;
pub mod store;
pub mod time;
