//! The encoder: sizes a packet first, then writes it in one pass into the caller's buffer.

use super::varint::{MAX_VARINT, put_varint, varint_len};
use crate::error::EncodeError;
use crate::packet::*;
use crate::properties::{Properties, Property, PropertyContext};
use crate::qos::QoS;
use crate::reason::ReasonCode;
use crate::version::ProtocolVersion;
use bytes::BufMut;

/// Appends `packet`, encoded for `version`, to `buf`; returns the number of bytes written.
///
/// Nothing is written when the packet cannot be encoded. Fields that do not exist in 3.1.1
/// (properties, most reason codes) are left out under 3.1.1; a failure reason code in a 3.1.1
/// SUBACK is sent as 0x80 and in a 3.1.1 CONNACK as the matching return code.
pub fn encode_packet(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut impl BufMut,
) -> Result<usize, EncodeError> {
    let body = body_len(packet, version)?;
    framed(first_byte(packet), body, buf, |b| {
        write_body(packet, version, b)
    })
}

/// [`encode_packet`] of a PUBLISH held by reference: what a caller that keeps the message
/// (the broker's write-ahead log records) uses, rather than cloning it into a [`Packet`].
pub fn encode_publish(
    publish: &Publish,
    version: ProtocolVersion,
    buf: &mut impl BufMut,
) -> Result<usize, EncodeError> {
    let body = publish_body_len(publish, version)?;
    framed(publish_first_byte(publish), body, buf, |b| {
        write_publish_body(publish, version == ProtocolVersion::V5, b)
    })
}

/// Writes a packet's fixed header (`first` byte, then `body` as the remaining length) and its
/// body (`write`, which must write exactly `body` bytes); returns the bytes written. Nothing
/// is written when `body` is more than the remaining length can say.
fn framed<B: BufMut>(
    first: u8,
    body: usize,
    buf: &mut B,
    write: impl FnOnce(&mut B),
) -> Result<usize, EncodeError> {
    let remaining = u32::try_from(body)
        .ok()
        .filter(|&r| r <= MAX_VARINT)
        .ok_or(EncodeError::PacketTooLarge {
            size: body,
            max: MAX_VARINT as usize,
        })?;
    buf.put_u8(first);
    put_varint(buf, remaining);
    write(buf);
    Ok(1 + varint_len(remaining) + body)
}

/// The number of bytes `packet` takes on the wire under `version`, fixed header included.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let body = body_len(packet, version)?;
    if body > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge {
            size: body,
            max: MAX_VARINT as usize,
        });
    }
    Ok(1 + varint_len(body as u32) + body)
}

fn first_byte(packet: &Packet) -> u8 {
    let t = (packet.packet_type() as u8) << 4;
    match packet {
        Packet::Publish(p) => publish_first_byte(p),
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => t | 0b0010,
        _ => t,
    }
}

fn publish_first_byte(p: &Publish) -> u8 {
    ((PacketType::Publish as u8) << 4)
        | (u8::from(p.dup) << 3)
        | (p.qos.as_u8() << 1)
        | u8::from(p.retain)
}

fn publish_body_len(p: &Publish, version: ProtocolVersion) -> Result<usize, EncodeError> {
    if p.packet_id.is_some() != (p.qos != QoS::AtMostOnce) {
        return Err(EncodeError::PacketIdMismatch);
    }
    let mut n = str_len(p.topic.as_bytes(), "the topic name")?;
    if p.packet_id.is_some() {
        n += 2;
    }
    if version == ProtocolVersion::V5 {
        n += props_total(&p.properties, PropertyContext::Publish, "PUBLISH")?;
    }
    Ok(n + p.payload.len())
}

fn write_publish_body(p: &Publish, v5: bool, buf: &mut impl BufMut) {
    put_bin(buf, p.topic.as_bytes());
    if let Some(id) = p.packet_id {
        buf.put_u16(id.get());
    }
    if v5 {
        put_props(buf, &p.properties);
    }
    buf.put_slice(&p.payload);
}

fn str_len(s: &[u8], what: &'static str) -> Result<usize, EncodeError> {
    if s.len() > u16::MAX as usize {
        return Err(EncodeError::FieldTooLong(what));
    }
    Ok(2 + s.len())
}

/// The size of a property list's contents (without its own length prefix), after checking that
/// each property may appear in `ctx` and fits its field.
fn props_len(
    props: &Properties,
    ctx: PropertyContext,
    packet: &'static str,
) -> Result<usize, EncodeError> {
    for p in props {
        if !p.id().allowed_in(ctx) {
            return Err(EncodeError::PropertyNotAllowed(p.id(), packet));
        }
        match p {
            Property::SubscriptionIdentifier(v) if *v > MAX_VARINT => {
                return Err(EncodeError::VariableIntegerTooLarge);
            }
            Property::ContentType(s)
            | Property::ResponseTopic(s)
            | Property::AssignedClientIdentifier(s)
            | Property::AuthenticationMethod(s)
            | Property::ResponseInformation(s)
            | Property::ServerReference(s)
            | Property::ReasonString(s) => {
                str_len(s.as_bytes(), "a property")?;
            }
            Property::CorrelationData(b) | Property::AuthenticationData(b) => {
                str_len(b, "a property")?;
            }
            Property::UserProperty(k, v) => {
                str_len(k.as_bytes(), "a user property")?;
                str_len(v.as_bytes(), "a user property")?;
            }
            _ => {}
        }
    }
    Ok(raw_props_len(props))
}

/// The size of a property list's contents, for a list already checked by [`props_len`].
fn raw_props_len(props: &Properties) -> usize {
    props
        .iter()
        .map(|p| {
            1 + match p {
                Property::PayloadFormatIndicator(_)
                | Property::RequestProblemInformation(_)
                | Property::RequestResponseInformation(_)
                | Property::MaximumQoS(_)
                | Property::RetainAvailable(_)
                | Property::WildcardSubscriptionAvailable(_)
                | Property::SubscriptionIdentifierAvailable(_)
                | Property::SharedSubscriptionAvailable(_) => 1,
                Property::ServerKeepAlive(_)
                | Property::ReceiveMaximum(_)
                | Property::TopicAliasMaximum(_)
                | Property::TopicAlias(_) => 2,
                Property::MessageExpiryInterval(_)
                | Property::SessionExpiryInterval(_)
                | Property::WillDelayInterval(_)
                | Property::MaximumPacketSize(_) => 4,
                Property::SubscriptionIdentifier(v) => varint_len(*v),
                Property::ContentType(s)
                | Property::ResponseTopic(s)
                | Property::AssignedClientIdentifier(s)
                | Property::AuthenticationMethod(s)
                | Property::ResponseInformation(s)
                | Property::ServerReference(s)
                | Property::ReasonString(s) => 2 + s.len(),
                Property::CorrelationData(b) | Property::AuthenticationData(b) => 2 + b.len(),
                Property::UserProperty(k, v) => 4 + k.len() + v.len(),
            }
        })
        .sum()
}

/// A property list with its length prefix.
fn props_total(
    props: &Properties,
    ctx: PropertyContext,
    packet: &'static str,
) -> Result<usize, EncodeError> {
    let n = props_len(props, ctx, packet)?;
    if n > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge {
            size: n,
            max: MAX_VARINT as usize,
        });
    }
    Ok(varint_len(n as u32) + n)
}

/// Reason code and properties that may be left out when they are the defaults (PUBACK and the
/// like, DISCONNECT, AUTH): 0 bytes, 1 (reason only) or 1 + properties.
fn short_tail_len(
    rc: ReasonCode,
    props: &Properties,
    ctx: PropertyContext,
    packet: &'static str,
) -> Result<usize, EncodeError> {
    if !props.is_empty() {
        Ok(1 + props_total(props, ctx, packet)?)
    } else if rc != ReasonCode::SUCCESS {
        Ok(1)
    } else {
        Ok(0)
    }
}

fn body_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let v5 = version == ProtocolVersion::V5;
    let props = |p: &Properties, ctx, name| if v5 { props_total(p, ctx, name) } else { Ok(0) };
    Ok(match packet {
        Packet::Connect(c) => {
            let mut n = 2 + 4 + 1 + 1 + 2; // protocol name, level, flags, keep alive
            n += props(&c.properties, PropertyContext::Connect, "CONNECT")?;
            n += str_len(c.client_id.as_bytes(), "the client identifier")?;
            if let Some(w) = &c.will {
                n += props(&w.properties, PropertyContext::Will, "the will properties")?;
                n += str_len(w.topic.as_bytes(), "the will topic")?;
                n += str_len(&w.payload, "the will payload")?;
            }
            if let Some(u) = &c.username {
                n += str_len(u.as_bytes(), "the user name")?;
            }
            if let Some(p) = &c.password {
                n += str_len(p, "the password")?;
            }
            n
        }
        Packet::ConnAck(c) => 2 + props(&c.properties, PropertyContext::ConnAck, "CONNACK")?,
        Packet::Publish(p) => publish_body_len(p, version)?,
        Packet::PubAck(PubAck {
            reason_code,
            properties,
            ..
        })
        | Packet::PubRec(PubRec {
            reason_code,
            properties,
            ..
        })
        | Packet::PubRel(PubRel {
            reason_code,
            properties,
            ..
        })
        | Packet::PubComp(PubComp {
            reason_code,
            properties,
            ..
        }) => {
            if v5 {
                2 + short_tail_len(
                    *reason_code,
                    properties,
                    PropertyContext::PubResponse,
                    "a PUBACK",
                )?
            } else {
                2
            }
        }
        Packet::Subscribe(s) => {
            if s.subscriptions.is_empty() {
                return Err(EncodeError::EmptyList(PacketType::Subscribe));
            }
            let mut n = 2 + props(&s.properties, PropertyContext::Subscribe, "SUBSCRIBE")?;
            for sub in &s.subscriptions {
                n += str_len(sub.filter.as_bytes(), "a topic filter")? + 1;
            }
            n
        }
        Packet::SubAck(s) => {
            if s.reason_codes.is_empty() {
                return Err(EncodeError::EmptyList(PacketType::SubAck));
            }
            2 + props(&s.properties, PropertyContext::SubAck, "SUBACK")? + s.reason_codes.len()
        }
        Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(EncodeError::EmptyList(PacketType::Unsubscribe));
            }
            let mut n = 2 + props(&u.properties, PropertyContext::Unsubscribe, "UNSUBSCRIBE")?;
            for f in &u.filters {
                n += str_len(f.as_bytes(), "a topic filter")?;
            }
            n
        }
        Packet::UnsubAck(u) => {
            if v5 {
                2 + props(&u.properties, PropertyContext::UnsubAck, "UNSUBACK")?
                    + u.reason_codes.len()
            } else {
                2
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if v5 {
                short_tail_len(
                    d.reason_code,
                    &d.properties,
                    PropertyContext::Disconnect,
                    "DISCONNECT",
                )?
            } else {
                0
            }
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::NotInVersion(PacketType::Auth));
            }
            short_tail_len(a.reason_code, &a.properties, PropertyContext::Auth, "AUTH")?
        }
    })
}

fn put_bin(buf: &mut impl BufMut, b: &[u8]) {
    // Lengths were checked by `body_len`.
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

fn put_props(buf: &mut impl BufMut, props: &Properties) {
    // Validity and sizes were checked by `body_len`.
    let len = raw_props_len(props);
    put_varint(buf, len as u32);
    for p in props {
        buf.put_u8(p.id() as u8);
        match p {
            Property::PayloadFormatIndicator(v)
            | Property::RequestProblemInformation(v)
            | Property::RequestResponseInformation(v)
            | Property::MaximumQoS(v)
            | Property::RetainAvailable(v)
            | Property::WildcardSubscriptionAvailable(v)
            | Property::SubscriptionIdentifierAvailable(v)
            | Property::SharedSubscriptionAvailable(v) => buf.put_u8(*v),
            Property::ServerKeepAlive(v)
            | Property::ReceiveMaximum(v)
            | Property::TopicAliasMaximum(v)
            | Property::TopicAlias(v) => buf.put_u16(*v),
            Property::MessageExpiryInterval(v)
            | Property::SessionExpiryInterval(v)
            | Property::WillDelayInterval(v)
            | Property::MaximumPacketSize(v) => buf.put_u32(*v),
            Property::SubscriptionIdentifier(v) => put_varint(buf, *v),
            Property::ContentType(s)
            | Property::ResponseTopic(s)
            | Property::AssignedClientIdentifier(s)
            | Property::AuthenticationMethod(s)
            | Property::ResponseInformation(s)
            | Property::ServerReference(s)
            | Property::ReasonString(s) => put_bin(buf, s.as_bytes()),
            Property::CorrelationData(b) | Property::AuthenticationData(b) => put_bin(buf, b),
            Property::UserProperty(k, v) => {
                put_bin(buf, k.as_bytes());
                put_bin(buf, v.as_bytes());
            }
        }
    }
}

/// Writes a reason code and properties that may be left out (see [`short_tail_len`]).
fn put_short_tail(buf: &mut impl BufMut, rc: ReasonCode, props: &Properties) {
    if !props.is_empty() {
        buf.put_u8(rc.0);
        put_props(buf, props);
    } else if rc != ReasonCode::SUCCESS {
        buf.put_u8(rc.0);
    }
}

fn write_body(packet: &Packet, version: ProtocolVersion, buf: &mut impl BufMut) {
    let v5 = version == ProtocolVersion::V5;
    match packet {
        Packet::Connect(c) => {
            put_bin(buf, b"MQTT");
            buf.put_u8(c.protocol.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0b10;
            }
            if let Some(w) = &c.will {
                flags |= 0b100 | (w.qos.as_u8() << 3);
                if w.retain {
                    flags |= 0b10_0000;
                }
            }
            if c.password.is_some() {
                flags |= 0b100_0000;
            }
            if c.username.is_some() {
                flags |= 0b1000_0000;
            }
            buf.put_u8(flags);
            buf.put_u16(c.keep_alive);
            if v5 {
                put_props(buf, &c.properties);
            }
            put_bin(buf, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                if v5 {
                    put_props(buf, &w.properties);
                }
                put_bin(buf, w.topic.as_bytes());
                put_bin(buf, &w.payload);
            }
            if let Some(u) = &c.username {
                put_bin(buf, u.as_bytes());
            }
            if let Some(p) = &c.password {
                put_bin(buf, p);
            }
        }
        Packet::ConnAck(c) => {
            buf.put_u8(u8::from(c.session_present));
            if v5 {
                buf.put_u8(c.reason_code.0);
                put_props(buf, &c.properties);
            } else {
                buf.put_u8(c.reason_code.to_v311_connack());
            }
        }
        Packet::Publish(p) => write_publish_body(p, v5, buf),
        Packet::PubAck(PubAck {
            packet_id,
            reason_code,
            properties,
        })
        | Packet::PubRec(PubRec {
            packet_id,
            reason_code,
            properties,
        })
        | Packet::PubRel(PubRel {
            packet_id,
            reason_code,
            properties,
        })
        | Packet::PubComp(PubComp {
            packet_id,
            reason_code,
            properties,
        }) => {
            buf.put_u16(packet_id.get());
            if v5 {
                put_short_tail(buf, *reason_code, properties);
            }
        }
        Packet::Subscribe(s) => {
            buf.put_u16(s.packet_id.get());
            if v5 {
                put_props(buf, &s.properties);
            }
            for sub in &s.subscriptions {
                put_bin(buf, sub.filter.as_bytes());
                let o = &sub.options;
                let mut byte = o.qos.as_u8();
                if v5 {
                    byte |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling as u8) << 4;
                }
                buf.put_u8(byte);
            }
        }
        Packet::SubAck(s) => {
            buf.put_u16(s.packet_id.get());
            if v5 {
                put_props(buf, &s.properties);
            }
            for rc in &s.reason_codes {
                buf.put_u8(if v5 || rc.0 <= 2 { rc.0 } else { 0x80 });
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.packet_id.get());
            if v5 {
                put_props(buf, &u.properties);
            }
            for f in &u.filters {
                put_bin(buf, f.as_bytes());
            }
        }
        Packet::UnsubAck(u) => {
            buf.put_u16(u.packet_id.get());
            if v5 {
                put_props(buf, &u.properties);
                for rc in &u.reason_codes {
                    buf.put_u8(rc.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                put_short_tail(buf, d.reason_code, &d.properties);
            }
        }
        Packet::Auth(a) => put_short_tail(buf, a.reason_code, &a.properties),
    }
}
