//! The strict decoder.

use super::varint::get_varint;
use super::{MAX_PACKET_SIZE, Role};
use crate::error::DecodeError;
use crate::packet::*;
use crate::properties::{Properties, Property, PropertyContext, PropertyId};
use crate::qos::QoS;
use crate::reason::ReasonCode;
use crate::string::MqttStr;
use crate::topic;
use crate::version::ProtocolVersion;
use bytes::{Buf, Bytes, BytesMut};

/// An incremental decoder for one connection.
///
/// Feed it the connection's receive buffer with [`Decoder::decode`]: it returns `Ok(None)` until
/// a whole packet is buffered (reserving room for the rest when the size is known), then splits
/// that packet off the buffer. A server-side decoder starts with no version and accepts only
/// CONNECT, whose protocol level fixes the version for the rest of the connection.
#[derive(Debug, Clone)]
pub struct Decoder {
    role: Role,
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
}

impl Decoder {
    /// A decoder for `role`. A client passes the version it connects with; a server passes
    /// `None` and learns it from CONNECT.
    pub fn new(role: Role, version: Option<ProtocolVersion>) -> Decoder {
        Decoder {
            role,
            version,
            max_packet_size: MAX_PACKET_SIZE,
        }
    }

    /// The connection's protocol version, once known.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// Sets the protocol version (a client that reconnects with another version).
    pub fn set_version(&mut self, version: ProtocolVersion) {
        self.version = Some(version);
    }

    /// The largest packet accepted, in bytes including the fixed header.
    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// Sets the largest packet accepted (what we advertise as Maximum Packet Size).
    pub fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max.clamp(2, MAX_PACKET_SIZE);
    }

    /// Decodes the next packet from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; nothing was consumed. `Ok(Some(packet))` consumed
    /// exactly that packet. An error means the connection must be closed (after a DISCONNECT
    /// with [`DecodeError::reason_code`] under 5.0); the buffer's contents are then meaningless.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let Some((remaining, len_bytes)) = get_varint(&buf[1..])? else {
            return Ok(None);
        };
        let header_len = 1 + len_bytes;
        let total = header_len as u64 + u64::from(remaining);
        if total > u64::from(self.max_packet_size) {
            return Err(DecodeError::PacketTooLarge {
                size: total,
                max: self.max_packet_size,
            });
        }
        // Validate the type before waiting for the body, so garbage is refused at once.
        let packet_type = self.check_type(first)?;
        let total = total as usize;
        if buf.len() < total {
            // Room for the rest, but never more than 64 KiB on a length the peer merely claims.
            buf.reserve((total - buf.len()).min(64 * 1024));
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(header_len);
        let packet = self.decode_body(packet_type, first & 0x0F, frame)?;
        if let Packet::Connect(c) = &packet {
            self.version = Some(c.protocol);
        }
        Ok(Some(packet))
    }

    fn check_type(&self, first: u8) -> Result<PacketType, DecodeError> {
        let nibble = first >> 4;
        let packet_type =
            PacketType::from_u8(nibble).ok_or(DecodeError::ReservedPacketType(nibble))?;
        match self.version {
            None => {
                if packet_type != PacketType::Connect {
                    return Err(DecodeError::ExpectedConnect(packet_type));
                }
            }
            Some(v) => {
                if packet_type == PacketType::Auth && v == ProtocolVersion::V311 {
                    return Err(DecodeError::ReservedPacketType(nibble));
                }
                if packet_type == PacketType::Connect && self.role == Role::Server {
                    // [MQTT-3.1.0-2]: a second CONNECT is a protocol error.
                    return Err(DecodeError::SecondConnect);
                }
            }
        }
        let allowed = match self.role {
            Role::Server => packet_type.sent_by_client(),
            Role::Client => packet_type.sent_by_server(),
        };
        if !allowed {
            return Err(DecodeError::WrongDirection(packet_type));
        }
        let flags = first & 0x0F;
        let ok = match packet_type {
            PacketType::Publish => true, // checked with the packet
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => flags == 0b0010,
            _ => flags == 0,
        };
        if !ok {
            return Err(DecodeError::InvalidFixedHeaderFlags { packet_type, flags });
        }
        Ok(packet_type)
    }

    fn decode_body(&self, t: PacketType, flags: u8, body: Bytes) -> Result<Packet, DecodeError> {
        let mut r = Reader(body);
        let v5 = self.version == Some(ProtocolVersion::V5);
        let packet = match t {
            PacketType::Connect => Packet::Connect(Box::new(decode_connect(&mut r)?)),
            PacketType::ConnAck => Packet::ConnAck(self.decode_connack(&mut r)?),
            PacketType::Publish => Packet::Publish(self.decode_publish(flags, &mut r)?),
            PacketType::PubAck => {
                let (packet_id, reason_code, properties) = decode_pub_response(t, v5, &mut r)?;
                Packet::PubAck(PubAck {
                    packet_id,
                    reason_code,
                    properties,
                })
            }
            PacketType::PubRec => {
                let (packet_id, reason_code, properties) = decode_pub_response(t, v5, &mut r)?;
                Packet::PubRec(PubRec {
                    packet_id,
                    reason_code,
                    properties,
                })
            }
            PacketType::PubRel => {
                let (packet_id, reason_code, properties) = decode_pub_response(t, v5, &mut r)?;
                Packet::PubRel(PubRel {
                    packet_id,
                    reason_code,
                    properties,
                })
            }
            PacketType::PubComp => {
                let (packet_id, reason_code, properties) = decode_pub_response(t, v5, &mut r)?;
                Packet::PubComp(PubComp {
                    packet_id,
                    reason_code,
                    properties,
                })
            }
            PacketType::Subscribe => Packet::Subscribe(decode_subscribe(v5, &mut r)?),
            PacketType::SubAck => Packet::SubAck(decode_suback(v5, &mut r)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(v5, &mut r)?),
            PacketType::UnsubAck => Packet::UnsubAck(decode_unsuback(v5, &mut r)?),
            PacketType::PingReq => Packet::PingReq,
            PacketType::PingResp => Packet::PingResp,
            PacketType::Disconnect => Packet::Disconnect(self.decode_disconnect(v5, &mut r)?),
            PacketType::Auth => Packet::Auth(decode_auth(&mut r)?),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(t, r.0.len()));
        }
        Ok(packet)
    }

    fn decode_connack(&self, r: &mut Reader) -> Result<ConnAck, DecodeError> {
        let flags = r.u8("the acknowledge flags")?;
        if flags & 0xFE != 0 {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        let session_present = flags & 1 == 1;
        let code = r.u8("the reason code")?;
        let (reason_code, properties) = if self.version == Some(ProtocolVersion::V5) {
            let rc = ReasonCode(code);
            if !CONNACK_CODES.contains(&code) {
                return Err(DecodeError::InvalidReasonCode(PacketType::ConnAck, code));
            }
            (rc, r.properties(PropertyContext::ConnAck, "CONNACK")?)
        } else {
            let rc = ReasonCode::from_v311_connack(code)
                .ok_or(DecodeError::InvalidReasonCode(PacketType::ConnAck, code))?;
            (rc, Properties::new())
        };
        // [MQTT-3.2.2-4] / [MQTT-3.2.2-6]
        if session_present && !reason_code.is_success() {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        if let Some(q) = properties.maximum_qos()
            && q > 1
        {
            return Err(DecodeError::InvalidPropertyValue(PropertyId::MaximumQoS));
        }
        Ok(ConnAck {
            session_present,
            reason_code,
            properties,
        })
    }

    fn decode_publish(&self, flags: u8, r: &mut Reader) -> Result<Publish, DecodeError> {
        let dup = flags & 0b1000 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS("PUBLISH"))?;
        let retain = flags & 1 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQoS0);
        }
        let topic = r.string("the topic name")?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(r.packet_id(PacketType::Publish)?)
        };
        let v5 = self.version == Some(ProtocolVersion::V5);
        let properties = if v5 {
            r.properties(PropertyContext::Publish, "PUBLISH")?
        } else {
            Properties::new()
        };
        // Under 5.0 an empty topic name stands for the one a Topic Alias maps to.
        if !(topic.is_empty() && v5 && properties.topic_alias().is_some()) {
            check_topic_name(&topic)?;
        }
        if properties.topic_alias() == Some(0) {
            return Err(DecodeError::ZeroTopicAlias);
        }
        if self.role == Role::Server && properties.contains(PropertyId::SubscriptionIdentifier) {
            // [MQTT-3.3.4-6]
            return Err(DecodeError::PropertyNotAllowed(
                PropertyId::SubscriptionIdentifier,
                "a PUBLISH from a client",
            ));
        }
        let payload = r.rest();
        if properties.payload_format_indicator() == Some(1)
            && std::str::from_utf8(&payload).is_err()
        {
            return Err(DecodeError::PayloadFormatInvalid);
        }
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            payload,
            properties,
        })
    }

    fn decode_disconnect(&self, v5: bool, r: &mut Reader) -> Result<Disconnect, DecodeError> {
        if !v5 || r.0.is_empty() {
            return Ok(Disconnect::default());
        }
        let code = r.u8("the reason code")?;
        let valid = if self.role == Role::Server {
            DISCONNECT_CODES_FROM_CLIENT.contains(&code)
        } else {
            DISCONNECT_CODES.contains(&code)
        };
        if !valid {
            return Err(DecodeError::InvalidReasonCode(PacketType::Disconnect, code));
        }
        let properties = r.optional_properties(PropertyContext::Disconnect, "DISCONNECT")?;
        if self.role == Role::Client && properties.contains(PropertyId::SessionExpiryInterval) {
            // [MQTT-3.14.2-2]: the server must not send a session expiry interval.
            return Err(DecodeError::PropertyNotAllowed(
                PropertyId::SessionExpiryInterval,
                "a DISCONNECT from a server",
            ));
        }
        Ok(Disconnect {
            reason_code: ReasonCode(code),
            properties,
        })
    }
}

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
/// Codes a client may send: those the specification marks "Client or Server" or "Client".
const DISCONNECT_CODES_FROM_CLIENT: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary("the protocol name")?;
    let level = r.u8("the protocol level")?;
    if &name[..] != b"MQTT" {
        if &name[..] == b"MQIsdp" {
            return Err(DecodeError::UnsupportedProtocolVersion(level));
        }
        return Err(DecodeError::InvalidProtocolName);
    }
    let protocol =
        ProtocolVersion::from_level(level).ok_or(DecodeError::UnsupportedProtocolVersion(level))?;
    let v5 = protocol == ProtocolVersion::V5;
    let flags = r.u8("the connect flags")?;
    if flags & 1 != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let clean_start = flags & 0b10 != 0;
    let will_flag = flags & 0b100 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0b10_0000 != 0;
    let password_flag = flags & 0b100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidQoS("the will flags"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("the keep alive")?;
    let properties = if v5 {
        r.properties(PropertyContext::Connect, "CONNECT")?
    } else {
        Properties::new()
    };
    let client_id = r.string("the client identifier")?;
    let will = if will_flag {
        let properties = if v5 {
            r.properties(PropertyContext::Will, "the will properties")?
        } else {
            Properties::new()
        };
        let topic = r.string("the will topic")?;
        check_topic_name(&topic)?;
        let payload = r.binary("the will payload")?;
        if properties.payload_format_indicator() == Some(1)
            && std::str::from_utf8(&payload).is_err()
        {
            return Err(DecodeError::PayloadFormatInvalid);
        }
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string("the user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("the password")?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_pub_response(
    t: PacketType,
    v5: bool,
    r: &mut Reader,
) -> Result<(PacketId, ReasonCode, Properties), DecodeError> {
    let packet_id = r.packet_id(t)?;
    if !v5 || r.0.is_empty() {
        return Ok((packet_id, ReasonCode::SUCCESS, Properties::new()));
    }
    let code = r.u8("the reason code")?;
    let valid = match t {
        PacketType::PubAck | PacketType::PubRec => PUBACK_CODES,
        _ => PUBREL_CODES,
    };
    if !valid.contains(&code) {
        return Err(DecodeError::InvalidReasonCode(t, code));
    }
    let properties = r.optional_properties(PropertyContext::PubResponse, t.name())?;
    Ok((packet_id, ReasonCode(code), properties))
}

fn decode_subscribe(v5: bool, r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id(PacketType::Subscribe)?;
    let properties = if v5 {
        r.properties(PropertyContext::Subscribe, "SUBSCRIBE")?
    } else {
        Properties::new()
    };
    let mut subscriptions = Vec::new();
    while !r.0.is_empty() {
        let filter = r.string("the topic filter")?;
        check_filter(&filter)?;
        let o = r.u8("the subscription options")?;
        let qos = QoS::from_u8(o & 0b11).ok_or(DecodeError::InvalidQoS("subscription options"))?;
        let options = if v5 {
            let retain_handling = match (o >> 4) & 0b11 {
                0 => RetainHandling::SendAtSubscribe,
                1 => RetainHandling::SendIfNew,
                2 => RetainHandling::DoNotSend,
                _ => return Err(DecodeError::InvalidSubscriptionOptions(o)),
            };
            if o & 0b1100_0000 != 0 {
                return Err(DecodeError::InvalidSubscriptionOptions(o));
            }
            let no_local = o & 0b100 != 0;
            if no_local && filter.starts_with("$share/") {
                return Err(DecodeError::NoLocalOnSharedSubscription);
            }
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published: o & 0b1000 != 0,
                retain_handling,
            }
        } else {
            if o & 0b1111_1100 != 0 {
                return Err(DecodeError::InvalidSubscriptionOptions(o));
            }
            SubscriptionOptions::with_qos(qos)
        };
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe {
        packet_id,
        subscriptions,
        properties,
    })
}

fn decode_suback(v5: bool, r: &mut Reader) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id(PacketType::SubAck)?;
    let properties = if v5 {
        r.properties(PropertyContext::SubAck, "SUBACK")?
    } else {
        Properties::new()
    };
    let valid: &[u8] = if v5 {
        SUBACK_CODES
    } else {
        &[0x00, 0x01, 0x02, 0x80]
    };
    let mut reason_codes = Vec::with_capacity(r.0.len());
    for &c in r.rest().iter() {
        if !valid.contains(&c) {
            return Err(DecodeError::InvalidReasonCode(PacketType::SubAck, c));
        }
        reason_codes.push(ReasonCode(c));
    }
    if reason_codes.is_empty() {
        return Err(DecodeError::UnexpectedEnd("the SUBACK reason codes"));
    }
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

fn decode_unsubscribe(v5: bool, r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id(PacketType::Unsubscribe)?;
    let properties = if v5 {
        r.properties(PropertyContext::Unsubscribe, "UNSUBSCRIBE")?
    } else {
        Properties::new()
    };
    let mut filters = Vec::new();
    while !r.0.is_empty() {
        let filter = r.string("the topic filter")?;
        check_filter(&filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(v5: bool, r: &mut Reader) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id(PacketType::UnsubAck)?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: Properties::new(),
        });
    }
    let properties = r.properties(PropertyContext::UnsubAck, "UNSUBACK")?;
    let mut reason_codes = Vec::with_capacity(r.0.len());
    for &c in r.rest().iter() {
        if !UNSUBACK_CODES.contains(&c) {
            return Err(DecodeError::InvalidReasonCode(PacketType::UnsubAck, c));
        }
        reason_codes.push(ReasonCode(c));
    }
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    if r.0.is_empty() {
        return Ok(Auth::default());
    }
    let code = r.u8("the reason code")?;
    if !AUTH_CODES.contains(&code) {
        return Err(DecodeError::InvalidReasonCode(PacketType::Auth, code));
    }
    let properties = r.optional_properties(PropertyContext::Auth, "AUTH")?;
    Ok(Auth {
        reason_code: ReasonCode(code),
        properties,
    })
}

fn check_filter(f: &str) -> Result<(), DecodeError> {
    topic::validate_topic_filter(f).map_err(DecodeError::InvalidTopicFilter)
}

fn check_topic_name(t: &str) -> Result<(), DecodeError> {
    topic::validate_topic_name(t).map_err(DecodeError::InvalidTopicName)
}

/// A cursor over a frozen packet body; every read checks the length first.
struct Reader(Bytes);

impl Reader {
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        if self.0.is_empty() {
            return Err(DecodeError::UnexpectedEnd(what));
        }
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        if self.0.len() < 2 {
            return Err(DecodeError::UnexpectedEnd(what));
        }
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        if self.0.len() < 4 {
            return Err(DecodeError::UnexpectedEnd(what));
        }
        Ok(self.0.get_u32())
    }

    fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match get_varint(&self.0)? {
            Some((v, n)) => {
                self.0.advance(n);
                Ok(v)
            }
            None => Err(DecodeError::UnexpectedEnd(what)),
        }
    }

    fn packet_id(&mut self, t: PacketType) -> Result<PacketId, DecodeError> {
        let id = self.u16("the packet identifier")?;
        PacketId::new(id).ok_or(DecodeError::ZeroPacketId(t))
    }

    fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)? as usize;
        if self.0.len() < len {
            return Err(DecodeError::UnexpectedEnd(what));
        }
        Ok(self.0.split_to(len))
    }

    fn string(&mut self, what: &'static str) -> Result<MqttStr, DecodeError> {
        let b = self.binary(what)?;
        // [MQTT-1.5.4-1], [MQTT-1.5.4-2]; U+D800..U+DFFF cannot occur in valid UTF-8.
        if b.contains(&0) {
            return Err(DecodeError::NullCharacter(what));
        }
        MqttStr::from_utf8(b).map_err(|_| DecodeError::InvalidUtf8(what))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }

    /// A property list that may be left out along with the reason code before it (PUBACK and
    /// the like, DISCONNECT, AUTH).
    fn optional_properties(
        &mut self,
        ctx: PropertyContext,
        packet: &'static str,
    ) -> Result<Properties, DecodeError> {
        if self.0.is_empty() {
            return Ok(Properties::new());
        }
        self.properties(ctx, packet)
    }

    fn properties(
        &mut self,
        ctx: PropertyContext,
        packet: &'static str,
    ) -> Result<Properties, DecodeError> {
        let len = self.varint("the property length")? as usize;
        if self.0.len() < len {
            return Err(DecodeError::UnexpectedEnd("the properties"));
        }
        let mut r = Reader(self.0.split_to(len));
        let mut props = Properties::new();
        let mut seen: u64 = 0;
        while !r.0.is_empty() {
            let raw = r.varint("the property identifier")?;
            let id = u8::try_from(raw)
                .ok()
                .and_then(PropertyId::from_u8)
                .ok_or(DecodeError::UnknownProperty(raw.min(0xFF) as u8))?;
            if !id.allowed_in(ctx) {
                return Err(DecodeError::PropertyNotAllowed(id, packet));
            }
            let bit = 1u64 << (id as u8);
            if seen & bit != 0 && !id.repeatable_in(ctx) {
                return Err(DecodeError::DuplicateProperty(id));
            }
            seen |= bit;
            let p = r.property(id)?;
            props.push(p);
        }
        if props.authentication_data().is_some() && props.authentication_method().is_none() {
            return Err(DecodeError::AuthDataWithoutMethod);
        }
        Ok(props)
    }

    fn property(&mut self, id: PropertyId) -> Result<Property, DecodeError> {
        use PropertyId as I;
        const WHAT: &str = "a property value";
        let bool_byte = |r: &mut Reader| -> Result<u8, DecodeError> {
            let v = r.u8(WHAT)?;
            if v > 1 {
                Err(DecodeError::InvalidPropertyValue(id))
            } else {
                Ok(v)
            }
        };
        let nonzero_u16 = |r: &mut Reader| -> Result<u16, DecodeError> {
            let v = r.u16(WHAT)?;
            if v == 0 {
                Err(DecodeError::InvalidPropertyValue(id))
            } else {
                Ok(v)
            }
        };
        Ok(match id {
            I::PayloadFormatIndicator => Property::PayloadFormatIndicator(bool_byte(self)?),
            I::MessageExpiryInterval => Property::MessageExpiryInterval(self.u32(WHAT)?),
            I::ContentType => Property::ContentType(self.string("the content type")?),
            I::ResponseTopic => {
                let t = self.string("the response topic")?;
                if topic::validate_topic_name(&t).is_err() {
                    return Err(DecodeError::InvalidPropertyValue(id));
                }
                Property::ResponseTopic(t)
            }
            I::CorrelationData => Property::CorrelationData(self.binary(WHAT)?),
            I::SubscriptionIdentifier => {
                let v = self.varint(WHAT)?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue(id));
                }
                Property::SubscriptionIdentifier(v)
            }
            I::SessionExpiryInterval => Property::SessionExpiryInterval(self.u32(WHAT)?),
            I::AssignedClientIdentifier => {
                Property::AssignedClientIdentifier(self.string("the assigned client identifier")?)
            }
            I::ServerKeepAlive => Property::ServerKeepAlive(self.u16(WHAT)?),
            I::AuthenticationMethod => {
                Property::AuthenticationMethod(self.string("the authentication method")?)
            }
            I::AuthenticationData => Property::AuthenticationData(self.binary(WHAT)?),
            I::RequestProblemInformation => Property::RequestProblemInformation(bool_byte(self)?),
            I::WillDelayInterval => Property::WillDelayInterval(self.u32(WHAT)?),
            I::RequestResponseInformation => Property::RequestResponseInformation(bool_byte(self)?),
            I::ResponseInformation => {
                Property::ResponseInformation(self.string("the response information")?)
            }
            I::ServerReference => Property::ServerReference(self.string("the server reference")?),
            I::ReasonString => Property::ReasonString(self.string("the reason string")?),
            I::ReceiveMaximum => Property::ReceiveMaximum(nonzero_u16(self)?),
            I::TopicAliasMaximum => Property::TopicAliasMaximum(self.u16(WHAT)?),
            I::TopicAlias => {
                let v = self.u16(WHAT)?;
                if v == 0 {
                    return Err(DecodeError::ZeroTopicAlias);
                }
                Property::TopicAlias(v)
            }
            I::MaximumQoS => Property::MaximumQoS(bool_byte(self)?),
            I::RetainAvailable => Property::RetainAvailable(bool_byte(self)?),
            I::UserProperty => Property::UserProperty(
                self.string("a user property name")?,
                self.string("a user property value")?,
            ),
            I::MaximumPacketSize => {
                let v = self.u32(WHAT)?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue(id));
                }
                Property::MaximumPacketSize(v)
            }
            I::WildcardSubscriptionAvailable => {
                Property::WildcardSubscriptionAvailable(bool_byte(self)?)
            }
            I::SubscriptionIdentifierAvailable => {
                Property::SubscriptionIdentifierAvailable(bool_byte(self)?)
            }
            I::SharedSubscriptionAvailable => {
                Property::SharedSubscriptionAvailable(bool_byte(self)?)
            }
        })
    }
}
