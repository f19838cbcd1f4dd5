//! The QoS 1 and 2 delivery state machines, for either side of a connection, and keep alive.
//!
//! - [`Outgoing`] sends PUBLISH: packet identifiers, the inflight window bounded by the peer's
//!   Receive Maximum, a bounded pending queue, PUBREL, redelivery with DUP on a resumed session.
//! - [`Incoming`] receives PUBLISH: PUBACK / PUBREC / PUBCOMP, exactly-once delivery of QoS 2
//!   messages to the application, our Receive Maximum, manual acknowledgement.
//! - [`KeepAlive`] says when to ping and when the peer is gone.
//!
//! They are sans-I/O, like `quinn-proto`: feed packets in with `handle_*`, take packets out with
//! `poll_transmit`, pass the time in as `now`, read deadlines from `poll_timeout`. A broker runs
//! one `Outgoing` (to the subscriber) and one `Incoming` (from the publisher) per session; so
//! does a client, the other way round. Each type's documentation states its calling contract.
//!
//! What they do not do: encode packets, store anything durably (they expose snapshots and
//! `restore_*` for the caller's store), route messages, or expire them.

mod error;
#[doc(hidden)]
pub mod fuzz;
mod incoming;
mod keep_alive;
mod outgoing;
mod packet_ids;

pub use error::{QueueFull, QueueLimit, StateError};
#[doc(hidden)]
pub use fuzz::fuzz_exchange;
pub use incoming::{AckMode, Incoming, IncomingConfig, IncomingStats};
pub use keep_alive::{KeepAlive, KeepAliveAction};
pub use outgoing::{
    Completed, Inflight, InflightEntry, Orphan, Outgoing, OutgoingConfig, OutgoingStats,
    SessionLoss, Ticket,
};
pub use packet_ids::IdHasher;
