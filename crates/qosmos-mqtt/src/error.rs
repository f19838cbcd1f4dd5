//! Codec errors, each mapped to the reason code it is sent as.

use crate::packet::PacketType;
use crate::properties::PropertyId;
use crate::reason::ReasonCode;
use crate::topic::TopicError;

/// Why a packet could not be decoded.
///
/// Every variant is a rule of the MQTT 3.1.1 or 5.0 specification. [`DecodeError::reason_code`]
/// gives the reason code to send in a 5.0 DISCONNECT (or CONNACK, when the packet was CONNECT);
/// under 3.1.1 the connection is simply closed, except for
/// [`DecodeError::UnsupportedProtocolVersion`] which is answered with CONNACK return code 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The Remaining Length (or another Variable Byte Integer) uses more than four bytes, or more
    /// bytes than its value needs.
    #[error("malformed variable byte integer")]
    MalformedVariableInteger,
    /// The packet is larger than the Maximum Packet Size; detected from the fixed header, before
    /// the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge {
        /// The packet's total size in bytes.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// Packet type 0 (reserved), or AUTH (15) under 3.1.1.
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// The flags in the low nibble of the first byte are not the ones the type requires.
    #[error("invalid fixed header flags 0x{flags:X} for {packet_type}")]
    InvalidFixedHeaderFlags {
        /// The packet type.
        packet_type: PacketType,
        /// The flags received.
        flags: u8,
    },
    /// The first packet on a connection was not CONNECT.
    #[error("expected CONNECT as the first packet, got {0}")]
    ExpectedConnect(PacketType),
    /// A second CONNECT on a connection [MQTT-3.1.0-2] (or a server-side decoder given a version
    /// up front: a server passes `None` and learns the version from CONNECT).
    #[error("a second CONNECT on the same connection")]
    SecondConnect,
    /// A packet that only the other side may send (e.g. a CONNACK sent to a server).
    #[error("{0} is not sent in this direction")]
    WrongDirection(PacketType),
    /// The packet ends before one of its fields.
    #[error("packet ends before {0}")]
    UnexpectedEnd(&'static str),
    /// The packet has bytes after its last field.
    #[error("{0} has {1} unexpected trailing bytes")]
    TrailingBytes(PacketType, usize),
    /// A UTF-8 string field is not well-formed UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// A UTF-8 string field contains U+0000.
    #[error("U+0000 in {0}")]
    NullCharacter(&'static str),
    /// The protocol name is not "MQTT".
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A protocol level qosmos does not speak (only 4 = 3.1.1 and 5 = 5.0).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// The reserved bit of the CONNECT flags is set.
    #[error("reserved CONNECT flag set")]
    ConnectReservedFlag,
    /// Will QoS or Will Retain set without the Will Flag.
    #[error("will QoS or retain set without a will")]
    WillFlagsWithoutWill,
    /// A QoS of 3 (in the fixed header, the will flags or subscription options).
    #[error("QoS 3 in {0}")]
    InvalidQoS(&'static str),
    /// MQTT 3.1.1: a password without a user name.
    #[error("password without a user name")]
    PasswordWithoutUsername,
    /// A PUBLISH at QoS 0 with the DUP flag set.
    #[error("DUP set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    /// Packet identifier 0 where one is required.
    #[error("packet identifier 0 in {0}")]
    ZeroPacketId(PacketType),
    /// A topic name with a wildcard, an empty topic name without a topic alias, or another invalid
    /// topic name.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    /// A syntactically invalid topic filter.
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    /// SUBSCRIBE or UNSUBSCRIBE with no topic filter.
    #[error("{0} with no topic filters")]
    NoTopicFilters(PacketType),
    /// Reserved bits set in subscription options, or Retain Handling 3.
    #[error("invalid subscription options 0x{0:02X}")]
    InvalidSubscriptionOptions(u8),
    /// No Local on a shared subscription.
    #[error("no local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// A property identifier the specification does not define.
    #[error("unknown property identifier 0x{0:02X}")]
    UnknownProperty(u8),
    /// A property that may not appear in this packet.
    #[error("property {0:?} is not allowed in {1}")]
    PropertyNotAllowed(PropertyId, &'static str),
    /// A property that may appear once appeared twice.
    #[error("property {0:?} appears more than once")]
    DuplicateProperty(PropertyId),
    /// A property with a value the specification forbids (e.g. Receive Maximum 0).
    #[error("invalid value for property {0:?}")]
    InvalidPropertyValue(PropertyId),
    /// Topic Alias 0.
    #[error("topic alias 0")]
    ZeroTopicAlias,
    /// Authentication Data without an Authentication Method.
    #[error("authentication data without an authentication method")]
    AuthDataWithoutMethod,
    /// A reason code this packet may not carry.
    #[error("reason code 0x{1:02X} is not valid in {0}")]
    InvalidReasonCode(PacketType, u8),
    /// The CONNACK acknowledge flags have reserved bits set, or session present with a failure.
    #[error("invalid CONNACK flags 0x{0:02X}")]
    InvalidConnAckFlags(u8),
    /// The Payload Format Indicator says UTF-8 but the payload is not.
    #[error("payload is not UTF-8 although its format indicator says so")]
    PayloadFormatInvalid,
}

impl DecodeError {
    /// The reason code this error is sent as in an MQTT 5.0 DISCONNECT or CONNACK.
    pub const fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolVersion(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ExpectedConnect(_)
            | SecondConnect
            | WrongDirection(_)
            | ZeroPacketId(_)
            | NoTopicFilters(_)
            | NoLocalOnSharedSubscription
            | DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | AuthDataWithoutMethod
            | InvalidReasonCode(..) => ReasonCode::PROTOCOL_ERROR,
            InvalidTopicName(_) => ReasonCode::TOPIC_NAME_INVALID,
            InvalidTopicFilter(_) => ReasonCode::TOPIC_FILTER_INVALID,
            ZeroTopicAlias => ReasonCode::TOPIC_ALIAS_INVALID,
            PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
            MalformedVariableInteger
            | ReservedPacketType(_)
            | InvalidFixedHeaderFlags { .. }
            | UnexpectedEnd(_)
            | TrailingBytes(..)
            | InvalidUtf8(_)
            | NullCharacter(_)
            | InvalidProtocolName
            | ConnectReservedFlag
            | WillFlagsWithoutWill
            | InvalidQoS(_)
            | PasswordWithoutUsername
            | DupOnQoS0
            | InvalidSubscriptionOptions(_)
            | UnknownProperty(_)
            | PropertyNotAllowed(..)
            | InvalidConnAckFlags(_) => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    #[error("{0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// The packet would exceed the maximum remaining length (268,435,455) or the peer's Maximum
    /// Packet Size.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// The packet's size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A PUBLISH whose packet identifier does not agree with its QoS.
    #[error("a PUBLISH at QoS 1 or 2 needs a packet identifier, and at QoS 0 must have none")]
    PacketIdMismatch,
    /// SUBSCRIBE, UNSUBSCRIBE or SUBACK with an empty list.
    #[error("{0} needs at least one entry")]
    EmptyList(PacketType),
    /// AUTH under MQTT 3.1.1, which has no such packet.
    #[error("{0} does not exist in MQTT 3.1.1")]
    NotInVersion(PacketType),
    /// A property that may not appear in this packet.
    #[error("property {0:?} is not allowed in {1}")]
    PropertyNotAllowed(PropertyId, &'static str),
    /// A Variable Byte Integer property value above 268,435,455.
    #[error("value too large for a variable byte integer")]
    VariableIntegerTooLarge,
}
