//! The errors of the delivery state machines, and the reason code each one is sent as.

use crate::packet::{PacketId, PacketType, Publish};
use crate::qos::QoS;
use crate::reason::ReasonCode;

/// A packet that does not fit the state of its QoS exchange.
///
/// The state machine is unchanged when one of these is returned: nothing was delivered,
/// completed or queued for sending. Each variant says what the caller should do; in short,
/// either answer with [`StateError::reason_code`] where the packet has a response that carries a
/// reason code, or close the connection with [`StateError::disconnect_reason_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A PUBACK, PUBREC or PUBCOMP (or a local `ack`) named a packet identifier that has no
    /// exchange in flight.
    ///
    /// Over one TCP connection this only happens with a confused peer. Ignoring it (and logging
    /// it) is safe: no message is lost by doing so. A strict endpoint closes the connection with
    /// [`StateError::disconnect_reason_code`] (Protocol Error).
    #[error("{packet} names packet identifier {packet_id}, which has no exchange in flight")]
    PacketIdNotFound {
        /// The packet (or, for a local acknowledgement, PUBLISH) that named it.
        packet: PacketType,
        /// The identifier.
        packet_id: PacketId,
    },
    /// An acknowledgement arrived for an exchange in another stage: a PUBACK for a QoS 2
    /// message, a PUBCOMP before PUBREC, a PUBREL before we sent PUBREC.
    ///
    /// A protocol error by the peer: close the connection with Protocol Error (0x82).
    #[error("{packet} for packet identifier {packet_id}, whose exchange awaits {expected}")]
    UnexpectedPacket {
        /// The packet received.
        packet: PacketType,
        /// Its packet identifier.
        packet_id: PacketId,
        /// What the exchange awaits.
        expected: PacketType,
    },
    /// A PUBLISH reused a packet identifier that an exchange of another QoS still holds: the two
    /// ends disagree about the session state.
    ///
    /// Under 5.0 answer it with a PUBACK (QoS 1) or PUBREC (QoS 2) carrying
    /// [`ReasonCode::PACKET_IDENTIFIER_IN_USE`], or close the connection with Protocol Error.
    #[error("PUBLISH with QoS {qos} uses packet identifier {packet_id}, which is in use")]
    PacketIdInUse {
        /// The identifier.
        packet_id: PacketId,
        /// The QoS of the PUBLISH.
        qos: QoS,
    },
    /// A QoS 1 or 2 PUBLISH arrived while Receive Maximum exchanges were already unacknowledged
    /// on this connection (MQTT 5.0 section 4.9, Flow Control).
    ///
    /// Close the connection with Receive Maximum exceeded (0x93).
    #[error("more than Receive Maximum ({maximum}) unacknowledged QoS 1 and 2 PUBLISH packets")]
    ReceiveMaximumExceeded {
        /// Our Receive Maximum.
        maximum: u16,
    },
    /// A PUBLISH whose packet identifier does not match its QoS: QoS 1 or 2 without one, or
    /// QoS 0 with one. The codec rejects these, so this only comes from hand-built packets.
    ///
    /// Close the connection with Malformed Packet (0x81).
    #[error("PUBLISH with QoS {qos} {}", if *.qos == QoS::AtMostOnce { "has a packet identifier" } else { "has no packet identifier" })]
    PacketIdMismatch {
        /// The QoS of the PUBLISH.
        qos: QoS,
    },
}

impl StateError {
    /// The reason code of the response that reports this error, where the packet has one:
    /// PUBACK / PUBREC for [`StateError::PacketIdInUse`], PUBREL / PUBCOMP for
    /// [`StateError::PacketIdNotFound`]; for the others the DISCONNECT reason code.
    pub const fn reason_code(&self) -> ReasonCode {
        match self {
            StateError::PacketIdNotFound { .. } => ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            StateError::PacketIdInUse { .. } => ReasonCode::PACKET_IDENTIFIER_IN_USE,
            StateError::UnexpectedPacket { .. } => ReasonCode::PROTOCOL_ERROR,
            StateError::ReceiveMaximumExceeded { .. } => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            StateError::PacketIdMismatch { .. } => ReasonCode::MALFORMED_PACKET,
        }
    }

    /// The reason code to close the connection with, for a caller that does. DISCONNECT cannot
    /// carry 0x91 or 0x92, so those become Protocol Error.
    pub const fn disconnect_reason_code(&self) -> ReasonCode {
        match self {
            StateError::PacketIdNotFound { .. } | StateError::PacketIdInUse { .. } => {
                ReasonCode::PROTOCOL_ERROR
            }
            other => other.reason_code(),
        }
    }
}

/// Which bound of the pending queue a [`QueueFull`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueLimit {
    /// [`OutgoingConfig::max_pending`](super::OutgoingConfig::max_pending) messages are waiting.
    Count(usize),
    /// The payloads would exceed
    /// [`OutgoingConfig::max_pending_bytes`](super::OutgoingConfig::max_pending_bytes).
    Bytes(usize),
}

/// [`Outgoing::publish`](super::Outgoing::publish) could not queue the message: the pending queue
/// is full. The message is handed back, untouched; nothing was queued.
///
/// A client reports it to the publisher (or waits for completions and retries); a broker
/// delivering to a slow subscriber decides whether to drop the subscriber's copy (and count it)
/// or to push back on the publisher, for instance with [`QueueFull::reason_code`] in its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pending queue is full ({limit:?})")]
pub struct QueueFull {
    /// The message that was not queued.
    pub message: Box<Publish>,
    /// The bound that was hit.
    pub limit: QueueLimit,
}

impl QueueFull {
    /// The message that was not queued.
    pub fn into_message(self) -> Publish {
        *self.message
    }

    /// Quota exceeded (0x97): the code a broker answers the publisher with when it refuses a
    /// message because a queue is full.
    pub const fn reason_code(&self) -> ReasonCode {
        ReasonCode::QUOTA_EXCEEDED
    }
}
