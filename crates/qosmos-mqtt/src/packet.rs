//! The MQTT control packets, as plain data.
//!
//! One type per packet. A field that exists only in MQTT 5.0 (properties, most reason codes) is
//! empty or default under 3.1.1; the encoder leaves it out there.

use crate::properties::Properties;
use crate::qos::QoS;
use crate::reason::ReasonCode;
use crate::string::MqttStr;
use crate::version::ProtocolVersion;
use bytes::Bytes;
use std::num::NonZeroU16;

/// A packet identifier. Zero is not a valid identifier, so it cannot be represented.
pub type PacketId = NonZeroU16;

/// The packet type, the high nibble of the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)] // named as in the specification
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    /// The type for a nibble, `None` for the reserved value 0.
    pub const fn from_u8(v: u8) -> Option<PacketType> {
        use PacketType::*;
        Some(match v {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            15 => Auth,
            _ => return None,
        })
    }

    /// The name in capitals, as the specifications write it.
    pub const fn name(self) -> &'static str {
        use PacketType::*;
        match self {
            Connect => "CONNECT",
            ConnAck => "CONNACK",
            Publish => "PUBLISH",
            PubAck => "PUBACK",
            PubRec => "PUBREC",
            PubRel => "PUBREL",
            PubComp => "PUBCOMP",
            Subscribe => "SUBSCRIBE",
            SubAck => "SUBACK",
            Unsubscribe => "UNSUBSCRIBE",
            UnsubAck => "UNSUBACK",
            PingReq => "PINGREQ",
            PingResp => "PINGRESP",
            Disconnect => "DISCONNECT",
            Auth => "AUTH",
        }
    }

    /// Whether a client may send this packet (a server must never receive the others).
    pub const fn sent_by_client(self) -> bool {
        use PacketType::*;
        matches!(
            self,
            Connect
                | Publish
                | PubAck
                | PubRec
                | PubRel
                | PubComp
                | Subscribe
                | Unsubscribe
                | PingReq
                | Disconnect
                | Auth
        )
    }

    /// Whether a server may send this packet.
    pub const fn sent_by_server(self) -> bool {
        use PacketType::*;
        matches!(
            self,
            ConnAck
                | Publish
                | PubAck
                | PubRec
                | PubRel
                | PubComp
                | SubAck
                | UnsubAck
                | PingResp
                | Disconnect
                | Auth
        )
    }
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // one variant per packet type
pub enum Packet {
    /// Boxed: a CONNECT is 224 bytes and comes once per connection, and every packet moved
    /// (decoded, queued, sent) is as large as the largest variant; without it a `Packet` is
    /// 224 bytes instead of about 100.
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubRec),
    PubRel(PubRel),
    PubComp(PubComp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet's type.
    pub const fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT: the first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version the client speaks.
    pub protocol: ProtocolVersion,
    /// Clean Session (3.1.1) or Clean Start (5.0).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// The client identifier; may be empty (see the specifications for when).
    pub client_id: MqttStr,
    /// The will message, published by the server if the connection ends abnormally.
    pub will: Option<LastWill>,
    /// The user name.
    pub username: Option<MqttStr>,
    /// The password (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (5.0).
    pub properties: Properties,
}

impl Connect {
    /// A CONNECT with a client identifier, a clean start and the given version; everything else
    /// empty or default (keep alive 60 s).
    pub fn new(protocol: ProtocolVersion, client_id: impl Into<MqttStr>) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::new(),
        }
    }
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Where the will is published.
    pub topic: MqttStr,
    /// The will's payload.
    pub payload: Bytes,
    /// The will's QoS.
    pub qos: QoS,
    /// Whether the will is retained.
    pub retain: bool,
    /// Will properties (5.0).
    pub properties: Properties,
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Whether the server resumed a session it had for this client.
    pub session_present: bool,
    /// The connect reason code (3.1.1 return codes are mapped, see [`ReasonCode::to_v311_connack`]).
    pub reason_code: ReasonCode,
    /// CONNACK properties (5.0).
    pub properties: Properties,
}

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Set when this is a redelivery of a PUBLISH sent before.
    pub dup: bool,
    /// The QoS of this delivery.
    pub qos: QoS,
    /// The retain flag.
    pub retain: bool,
    /// The topic name. Under 5.0 it may be empty when a Topic Alias property names it.
    pub topic: MqttStr,
    /// The packet identifier, present exactly when `qos` is 1 or 2.
    pub packet_id: Option<PacketId>,
    /// The payload, shared with the receive buffer.
    pub payload: Bytes,
    /// PUBLISH properties (5.0).
    pub properties: Properties,
}

impl Publish {
    /// A PUBLISH with no flags set, QoS 0, no properties.
    pub fn new(topic: impl Into<MqttStr>, payload: impl Into<Bytes>) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            payload: payload.into(),
            properties: Properties::new(),
        }
    }
}

macro_rules! pub_response {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// The packet identifier of the exchange.
            pub packet_id: PacketId,
            /// The reason code (always success under 3.1.1).
            pub reason_code: ReasonCode,
            /// Properties (5.0): a reason string and user properties.
            pub properties: Properties,
        }

        impl $name {
            /// A successful response for `packet_id`.
            pub fn new(packet_id: PacketId) -> $name {
                $name { packet_id, reason_code: ReasonCode::SUCCESS, properties: Properties::new() }
            }
        }
    };
}

pub_response!(
    /// PUBACK: the answer to a QoS 1 PUBLISH.
    PubAck
);
pub_response!(
    /// PUBREC: the first answer to a QoS 2 PUBLISH.
    PubRec
);
pub_response!(
    /// PUBREL: the answer to PUBREC, which releases the packet identifier's message.
    PubRel
);
pub_response!(
    /// PUBCOMP: the answer to PUBREL, which ends a QoS 2 exchange.
    PubComp
);

/// What a server does with retained messages when a subscription is made (5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription did not exist before.
    SendIfNew = 1,
    /// Do not send them.
    DoNotSend = 2,
}

/// The options byte of one SUBSCRIBE entry. Under 3.1.1 only `qos` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// The maximum QoS the client wants for this subscription.
    pub qos: QoS,
    /// Do not deliver messages published by this same connection (5.0).
    pub no_local: bool,
    /// Keep the retain flag as published instead of clearing it (5.0).
    pub retain_as_published: bool,
    /// When to send retained messages (5.0).
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with this QoS and every 5.0 option at its default.
    pub fn with_qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            ..Default::default()
        }
    }
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filter.
    pub filter: MqttStr,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE: one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// The packet identifier.
    pub packet_id: PacketId,
    /// At least one subscription.
    pub subscriptions: Vec<Subscription>,
    /// SUBSCRIBE properties (5.0): a subscription identifier and user properties.
    pub properties: Properties,
}

/// SUBACK: one reason code per subscription of the SUBSCRIBE, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// The SUBSCRIBE's packet identifier.
    pub packet_id: PacketId,
    /// Granted QoS (0x00, 0x01, 0x02) or a failure (0x80 and up).
    pub reason_codes: Vec<ReasonCode>,
    /// SUBACK properties (5.0).
    pub properties: Properties,
}

/// UNSUBSCRIBE: one or more topic filters to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The packet identifier.
    pub packet_id: PacketId,
    /// At least one topic filter.
    pub filters: Vec<MqttStr>,
    /// UNSUBSCRIBE properties (5.0).
    pub properties: Properties,
}

/// UNSUBACK: under 5.0 one reason code per filter; under 3.1.1 none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// The UNSUBSCRIBE's packet identifier.
    pub packet_id: PacketId,
    /// One code per filter (5.0); empty under 3.1.1.
    pub reason_codes: Vec<ReasonCode>,
    /// UNSUBACK properties (5.0).
    pub properties: Properties,
}

/// DISCONNECT: the end of a connection, from either side under 5.0.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Why (5.0); normal disconnection by default.
    pub reason_code: ReasonCode,
    /// DISCONNECT properties (5.0).
    pub properties: Properties,
}

impl Disconnect {
    /// A DISCONNECT with this reason and no properties.
    pub fn new(reason_code: ReasonCode) -> Disconnect {
        Disconnect {
            reason_code,
            properties: Properties::new(),
        }
    }
}

/// AUTH: extended authentication exchange (5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Success, continue authentication, or re-authenticate.
    pub reason_code: ReasonCode,
    /// AUTH properties: authentication method and data, reason string, user properties.
    pub properties: Properties,
}
