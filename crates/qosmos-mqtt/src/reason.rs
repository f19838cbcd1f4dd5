//! Reason codes (MQTT 5.0 section 2.4) and their MQTT 3.1.1 equivalents.

/// An MQTT 5.0 reason code: a newtype over the wire byte, so that a code this crate has no
/// name for still survives a decode and encode round trip.
///
/// MQTT 3.1.1 has fewer codes (CONNACK return codes, SUBACK's 0x80); [`ReasonCode::to_v311_connack`]
/// maps a 5.0 code to the 3.1.1 CONNACK return code it is sent as.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ReasonCode(pub u8);

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $v:expr, $text:expr;)*) => {
        impl ReasonCode {
            $($(#[$doc])* pub const $name: ReasonCode = ReasonCode($v);)*

            /// The name the specification gives this code, `None` when it has none.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some($text),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// Success (also Normal disconnection and Granted QoS 0).
    SUCCESS = 0x00, "Success";
    /// Granted QoS 1 (SUBACK).
    GRANTED_QOS_1 = 0x01, "Granted QoS 1";
    /// Granted QoS 2 (SUBACK).
    GRANTED_QOS_2 = 0x02, "Granted QoS 2";
    /// Disconnect with Will Message.
    DISCONNECT_WITH_WILL = 0x04, "Disconnect with Will Message";
    /// No matching subscribers.
    NO_MATCHING_SUBSCRIBERS = 0x10, "No matching subscribers";
    /// No subscription existed.
    NO_SUBSCRIPTION_EXISTED = 0x11, "No subscription existed";
    /// Continue authentication.
    CONTINUE_AUTHENTICATION = 0x18, "Continue authentication";
    /// Re-authenticate.
    RE_AUTHENTICATE = 0x19, "Re-authenticate";
    /// Unspecified error.
    UNSPECIFIED_ERROR = 0x80, "Unspecified error";
    /// Malformed Packet.
    MALFORMED_PACKET = 0x81, "Malformed Packet";
    /// Protocol Error.
    PROTOCOL_ERROR = 0x82, "Protocol Error";
    /// Implementation specific error.
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83, "Implementation specific error";
    /// Unsupported Protocol Version.
    UNSUPPORTED_PROTOCOL_VERSION = 0x84, "Unsupported Protocol Version";
    /// Client Identifier not valid.
    CLIENT_IDENTIFIER_NOT_VALID = 0x85, "Client Identifier not valid";
    /// Bad User Name or Password.
    BAD_USER_NAME_OR_PASSWORD = 0x86, "Bad User Name or Password";
    /// Not authorized.
    NOT_AUTHORIZED = 0x87, "Not authorized";
    /// Server unavailable.
    SERVER_UNAVAILABLE = 0x88, "Server unavailable";
    /// Server busy.
    SERVER_BUSY = 0x89, "Server busy";
    /// Banned.
    BANNED = 0x8A, "Banned";
    /// Server shutting down.
    SERVER_SHUTTING_DOWN = 0x8B, "Server shutting down";
    /// Bad authentication method.
    BAD_AUTHENTICATION_METHOD = 0x8C, "Bad authentication method";
    /// Keep Alive timeout.
    KEEP_ALIVE_TIMEOUT = 0x8D, "Keep Alive timeout";
    /// Session taken over.
    SESSION_TAKEN_OVER = 0x8E, "Session taken over";
    /// Topic Filter invalid.
    TOPIC_FILTER_INVALID = 0x8F, "Topic Filter invalid";
    /// Topic Name invalid.
    TOPIC_NAME_INVALID = 0x90, "Topic Name invalid";
    /// Packet Identifier in use.
    PACKET_IDENTIFIER_IN_USE = 0x91, "Packet Identifier in use";
    /// Packet Identifier not found.
    PACKET_IDENTIFIER_NOT_FOUND = 0x92, "Packet Identifier not found";
    /// Receive Maximum exceeded.
    RECEIVE_MAXIMUM_EXCEEDED = 0x93, "Receive Maximum exceeded";
    /// Topic Alias invalid.
    TOPIC_ALIAS_INVALID = 0x94, "Topic Alias invalid";
    /// Packet too large.
    PACKET_TOO_LARGE = 0x95, "Packet too large";
    /// Message rate too high.
    MESSAGE_RATE_TOO_HIGH = 0x96, "Message rate too high";
    /// Quota exceeded.
    QUOTA_EXCEEDED = 0x97, "Quota exceeded";
    /// Administrative action.
    ADMINISTRATIVE_ACTION = 0x98, "Administrative action";
    /// Payload format invalid.
    PAYLOAD_FORMAT_INVALID = 0x99, "Payload format invalid";
    /// Retain not supported.
    RETAIN_NOT_SUPPORTED = 0x9A, "Retain not supported";
    /// QoS not supported.
    QOS_NOT_SUPPORTED = 0x9B, "QoS not supported";
    /// Use another server.
    USE_ANOTHER_SERVER = 0x9C, "Use another server";
    /// Server moved.
    SERVER_MOVED = 0x9D, "Server moved";
    /// Shared Subscriptions not supported.
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E, "Shared Subscriptions not supported";
    /// Connection rate exceeded.
    CONNECTION_RATE_EXCEEDED = 0x9F, "Connection rate exceeded";
    /// Maximum connect time.
    MAXIMUM_CONNECT_TIME = 0xA0, "Maximum connect time";
    /// Subscription Identifiers not supported.
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1, "Subscription Identifiers not supported";
    /// Wildcard Subscriptions not supported.
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2, "Wildcard Subscriptions not supported";
}

impl ReasonCode {
    /// Normal disconnection (DISCONNECT), the same byte as [`ReasonCode::SUCCESS`].
    pub const NORMAL_DISCONNECTION: ReasonCode = ReasonCode(0x00);
    /// Granted QoS 0 (SUBACK), the same byte as [`ReasonCode::SUCCESS`].
    pub const GRANTED_QOS_0: ReasonCode = ReasonCode(0x00);

    /// True for codes below 0x80, which report success.
    pub const fn is_success(self) -> bool {
        self.0 < 0x80
    }

    /// The MQTT 3.1.1 CONNACK return code that stands for this code (3.1.1 section 3.2.2.3).
    pub const fn to_v311_connack(self) -> u8 {
        match self {
            ReasonCode::SUCCESS => 0,
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => 1,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => 2,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD => 4,
            ReasonCode::NOT_AUTHORIZED | ReasonCode::BANNED => 5,
            _ => 3,
        }
    }

    /// The 5.0 code for an MQTT 3.1.1 CONNACK return code, `None` for a reserved value.
    pub const fn from_v311_connack(code: u8) -> Option<ReasonCode> {
        Some(match code {
            0 => ReasonCode::SUCCESS,
            1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            3 => ReasonCode::SERVER_UNAVAILABLE,
            4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            5 => ReasonCode::NOT_AUTHORIZED,
            _ => return None,
        })
    }
}

impl std::fmt::Debug for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "ReasonCode(0x{:02X} {n})", self.0),
            None => write!(f, "ReasonCode(0x{:02X})", self.0),
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} (0x{:02X})", self.0),
            None => write!(f, "reason code 0x{:02X}", self.0),
        }
    }
}

impl From<u8> for ReasonCode {
    fn from(v: u8) -> Self {
        ReasonCode(v)
    }
}
