//! The wire format: a strict incremental decoder and an encoder.
//!
//! Decoding follows mini-redis's framing discipline: check that a whole packet is buffered,
//! then parse it, then advance. The fixed header is read first, so a packet over the Maximum
//! Packet Size is refused before its body is buffered. A complete packet is split off the
//! caller's [`BytesMut`] and frozen; strings and payloads in the decoded [`Packet`] are slices
//! of it, not copies.
//!
//! ```
//! use bytes::BytesMut;
//! use qosmos_mqtt::codec::{Decoder, Role, encode_packet};
//! use qosmos_mqtt::{Packet, Publish, ProtocolVersion};
//!
//! let mut wire = BytesMut::new();
//! let publish = Publish::new("orders/store-1", &b"{}"[..]);
//! encode_packet(&Packet::Publish(publish.clone()), ProtocolVersion::V5, &mut wire).unwrap();
//!
//! let mut decoder = Decoder::new(Role::Client, Some(ProtocolVersion::V5));
//! let mut partial = wire.split_to(3);
//! assert_eq!(decoder.decode(&mut partial).unwrap(), None); // needs more bytes
//! partial.unsplit(wire);
//! assert_eq!(decoder.decode(&mut partial).unwrap(), Some(Packet::Publish(publish)));
//! ```

mod decode;
mod encode;
mod varint;

pub use decode::Decoder;
pub use encode::{encode_packet, encode_publish, encoded_len};
pub use varint::{MAX_VARINT, varint_len};

use crate::error::{DecodeError, EncodeError};
use crate::packet::Packet;
use crate::version::ProtocolVersion;
use bytes::{BufMut, Bytes, BytesMut};

/// The largest packet MQTT can describe: a 268,435,455-byte remaining length plus a five-byte
/// fixed header.
pub const MAX_PACKET_SIZE: u32 = 268_435_460;

/// Which side of the connection the decoder is on. A server refuses packets only a server
/// sends (and the reverse), and only a server learns the protocol version from CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We are the server: the peer is a client.
    Server,
    /// We are the client: the peer is a server.
    Client,
}

/// Decodes one whole packet from `bytes` as sent to `role` under `version`; the bytes must hold
/// exactly one packet.
pub fn decode_packet(
    bytes: &[u8],
    role: Role,
    version: Option<ProtocolVersion>,
) -> Result<Packet, DecodeError> {
    let mut d = Decoder::new(role, version);
    let mut buf = BytesMut::from(bytes);
    match d.decode(&mut buf)? {
        Some(p) if buf.is_empty() => Ok(p),
        Some(p) => Err(DecodeError::TrailingBytes(p.packet_type(), buf.len())),
        None => Err(DecodeError::UnexpectedEnd("the end of the packet")),
    }
}

/// An encoder for one connection: the protocol version and the peer's Maximum Packet Size.
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    /// The connection's protocol version.
    pub version: ProtocolVersion,
    /// The largest packet the peer accepts (its Maximum Packet Size; the protocol maximum when
    /// it set none).
    pub max_packet_size: u32,
}

impl Encoder {
    /// An encoder for `version` with no limit beyond the protocol's.
    pub fn new(version: ProtocolVersion) -> Encoder {
        Encoder {
            version,
            max_packet_size: MAX_PACKET_SIZE,
        }
    }

    /// Appends `packet` to `buf`, or fails without writing anything.
    pub fn encode(&self, packet: &Packet, buf: &mut impl BufMut) -> Result<usize, EncodeError> {
        let len = encoded_len(packet, self.version)?;
        if len > self.max_packet_size as usize {
            return Err(EncodeError::PacketTooLarge {
                size: len,
                max: self.max_packet_size as usize,
            });
        }
        encode_packet(packet, self.version, buf)
    }

    /// Encodes `packet` into a new buffer.
    pub fn to_bytes(&self, packet: &Packet) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(packet, &mut buf)?;
        Ok(buf.freeze())
    }
}
