//! MQTT 3.1.1 and 5.0, sans-I/O.
//!
//! `qosmos-mqtt` is the protocol core shared by the qosmos broker and client. It holds:
//!
//! - [`packet`]: every control packet of MQTT 3.1.1 and 5.0, CONNECT to AUTH, as plain data.
//! - [`codec`]: a strict, incremental, zero-copy decoder and an encoder that writes into the
//!   caller's [`bytes::BufMut`]. Every "malformed packet" and "protocol error" rule of both
//!   specifications that can be checked on a single packet is enforced, and each rejection is a
//!   typed [`DecodeError`] that maps to the [`ReasonCode`] it is sent as.
//! - [`topic`]: topic name and filter validation, matching, and `$share/{group}/{filter}`.
//! - [`index`]: a subscription index that matches a topic against many filters quickly.
//! - [`state`]: the QoS 1 and 2 delivery state machines for either side of a connection, and
//!   keep alive, driven by the caller with `handle_*` / `poll_*` and a `now` it passes in.
//!
//! # What it does not do
//!
//! It opens no socket, spawns no task, reads no clock and does not depend on tokio. It keeps no
//! sessions across connections beyond the state you hand it, stores nothing on disk, and does
//! not route messages between clients: that is the broker's job (`qosmos-broker`). It does not
//! implement WebSocket or TLS framing.
//!
//! # Why our own
//!
//! The MQTT protocol *is* the product: the bug that started qosmos lived in QoS handling, and
//! the existing Rust codecs either accept packets the specifications call malformed or tie the
//! codec to an I/O runtime. Writing it once, strictly, lets the broker and the client share one
//! tested implementation.

pub mod codec;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod index;
pub mod packet;
pub mod properties;
pub mod qos;
pub mod reason;
pub mod state;
pub mod string;
pub mod topic;
pub mod version;

pub use codec::{
    Decoder, Encoder, Role, decode_packet, encode_packet, encode_publish, encoded_len,
};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use properties::{Properties, Property, PropertyId};
pub use qos::QoS;
pub use reason::ReasonCode;
pub use string::MqttStr;
pub use version::ProtocolVersion;
