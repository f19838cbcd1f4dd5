//! The broker's log records and their binary encoding.
//!
//! Each record is `[encoding version: u8][kind tag: u8][fields…]`. Integers are little endian;
//! strings and byte fields are a `u32` length followed by the bytes; an option is a `0`/`1`
//! byte followed by the value; a PUBLISH is a length-prefixed MQTT 5.0 PUBLISH packet as the
//! codec writes it. Decoding is strict: every length is checked against what is left, every
//! enumerated byte against its values, and trailing bytes are an error, so a record decodes to
//! exactly one value or to a [`RecordError`], never a panic.
//!
//! New kinds of records get new tags; a field added to an existing kind gets a new tag too (or a
//! new encoding version), so an old log always decodes as it was written. Tags 17
//! ([`Record::SessionOps`]: client, `u32` count, then per operation the tag of the record of the
//! same name and its fields without the client) and 18 ([`Record::Composite`]: `u32` count, then
//! per part a `u32` length and a whole record) came with log format version 2.

use bytes::{BufMut, Bytes, BytesMut};
use qosmos_mqtt::{
    DecodeError, EncodeError, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS,
    RetainHandling, Role, SubscriptionOptions,
};

/// The record encoding this build writes (the first byte of every record).
pub const RECORD_VERSION: u8 = 1;

/// One change to the broker's durable state. The log is a sequence of these; replaying them in
/// order (see [`DurableState`](super::DurableState)) rebuilds the state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A session was created or its parameters changed (subscriptions and queue are kept).
    SessionUpsert {
        /// The client identifier.
        client_id: MqttStr,
        /// The protocol level of its last connection (4 = 3.1.1, 5 = 5.0).
        protocol_level: u8,
        /// The session expiry interval in seconds.
        expiry_interval: u32,
    },
    /// A session ended: its subscriptions, owed deliveries and awaited releases go with it.
    SessionDelete {
        /// The client identifier.
        client_id: MqttStr,
    },
    /// A subscription was made or replaced (before its SUBACK).
    Subscribe {
        /// The client identifier.
        client_id: MqttStr,
        /// The topic filter, `$share/…` included.
        filter: MqttStr,
        /// The granted options.
        options: SubscriptionOptions,
        /// The 5.0 subscription identifier.
        subscription_id: Option<u32>,
    },
    /// A subscription was removed.
    Unsubscribe {
        /// The client identifier.
        client_id: MqttStr,
        /// The topic filter.
        filter: MqttStr,
    },
    /// An application message, stored once and referenced by deliveries and retained topics.
    Message {
        /// The broker-assigned message id.
        id: u64,
        /// The message as published (topic resolved).
        publish: Publish,
        /// When the 5.0 message expiry interval runs out.
        expires_at_unix_ms: Option<u64>,
    },
    /// A message is dropped whatever still references it (e.g. it expired).
    MessageDrop {
        /// The message id.
        id: u64,
    },
    /// A delivery of a message is owed to a session. A session owes at most one delivery per
    /// message (overlapping subscriptions give one delivery carrying every subscription
    /// identifier, as MQTT 5.0 section 3.3.4 permits): a second `Enqueue` of the same message
    /// for the same session is ignored on replay.
    Enqueue {
        /// The client identifier.
        client_id: MqttStr,
        /// The message.
        message_id: u64,
        /// The delivery QoS (min of published and granted).
        qos: QoS,
        /// The retain flag to send.
        retain: bool,
        /// The subscription identifiers to send.
        subscription_ids: Vec<u32>,
    },
    /// A delivery was given a packet identifier; recorded before the PUBLISH goes out, so a
    /// restart resends with the same identifier and DUP.
    Sent {
        /// The client identifier.
        client_id: MqttStr,
        /// The message.
        message_id: u64,
        /// The packet identifier.
        packet_id: PacketId,
    },
    /// A QoS 2 delivery's PUBREC arrived: PUBREL is owed.
    Released {
        /// The client identifier.
        client_id: MqttStr,
        /// The message.
        message_id: u64,
        /// The packet identifier.
        packet_id: PacketId,
    },
    /// A delivery completed (PUBACK, PUBCOMP, or a QoS 0 PUBLISH sent).
    Delivered {
        /// The client identifier.
        client_id: MqttStr,
        /// The message.
        message_id: u64,
    },
    /// An incoming QoS 2 PUBLISH was accepted and PUBREC sent: its PUBREL is awaited.
    AwaitingRelease {
        /// The client identifier.
        client_id: MqttStr,
        /// The publisher's packet identifier.
        packet_id: PacketId,
    },
    /// The awaited PUBREL arrived (PUBCOMP sent).
    ReleaseDone {
        /// The client identifier.
        client_id: MqttStr,
        /// The publisher's packet identifier.
        packet_id: PacketId,
    },
    /// A topic's retained message was set.
    RetainedSet {
        /// The topic name.
        topic: MqttStr,
        /// The message.
        message_id: u64,
    },
    /// A topic's retained message was cleared.
    RetainedClear {
        /// The topic name.
        topic: MqttStr,
    },
    /// A will is owed for a client that went away, at `due_unix_ms`.
    WillPending {
        /// The client identifier.
        client_id: MqttStr,
        /// The will as a PUBLISH.
        publish: Publish,
        /// When to publish it.
        due_unix_ms: u64,
    },
    /// A will was published or cancelled.
    WillDone {
        /// The client identifier.
        client_id: MqttStr,
    },
    /// Several changes to one session's deliveries and awaited releases, applied in order:
    /// what `Sent`, `Released`, `Delivered`, `AwaitingRelease` and `ReleaseDone` records of one
    /// client would do, with the client named once. Written by [`Record::pack`].
    SessionOps {
        /// The client identifier.
        client_id: MqttStr,
        /// The changes, in order.
        ops: Vec<SessionOp>,
    },
    /// Several records applied in order, all or none: a torn tail never keeps part of it.
    /// Written by [`Record::pack`] for the records of one append (e.g. an incoming QoS 2
    /// PUBLISH's awaited release, message and deliveries). Never nested.
    Composite(Vec<Record>),
}

/// One change of a [`Record::SessionOps`], with the meaning of the record of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionOp {
    /// See [`Record::Sent`].
    Sent {
        /// The message.
        message_id: u64,
        /// The packet identifier.
        packet_id: PacketId,
    },
    /// See [`Record::Released`].
    Released {
        /// The message.
        message_id: u64,
        /// The packet identifier.
        packet_id: PacketId,
    },
    /// See [`Record::Delivered`].
    Delivered {
        /// The message.
        message_id: u64,
    },
    /// See [`Record::AwaitingRelease`].
    AwaitingRelease {
        /// The publisher's packet identifier.
        packet_id: PacketId,
    },
    /// See [`Record::ReleaseDone`].
    ReleaseDone {
        /// The publisher's packet identifier.
        packet_id: PacketId,
    },
}

impl SessionOp {
    /// The message the change is about, if any.
    pub fn message_id(&self) -> Option<u64> {
        match *self {
            SessionOp::Sent { message_id, .. }
            | SessionOp::Released { message_id, .. }
            | SessionOp::Delivered { message_id } => Some(message_id),
            SessionOp::AwaitingRelease { .. } | SessionOp::ReleaseDone { .. } => None,
        }
    }

    /// The single record with the same meaning.
    pub fn into_record(self, client_id: MqttStr) -> Record {
        match self {
            SessionOp::Sent {
                message_id,
                packet_id,
            } => Record::Sent {
                client_id,
                message_id,
                packet_id,
            },
            SessionOp::Released {
                message_id,
                packet_id,
            } => Record::Released {
                client_id,
                message_id,
                packet_id,
            },
            SessionOp::Delivered { message_id } => Record::Delivered {
                client_id,
                message_id,
            },
            SessionOp::AwaitingRelease { packet_id } => Record::AwaitingRelease {
                client_id,
                packet_id,
            },
            SessionOp::ReleaseDone { packet_id } => Record::ReleaseDone {
                client_id,
                packet_id,
            },
        }
    }
}

/// Why bytes did not decode as a [`Record`], or a record could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record ended inside a field.
    #[error("the record ends inside {0}")]
    UnexpectedEnd(&'static str),
    /// The record was written by a newer encoding.
    #[error("unknown record encoding version {0}")]
    UnknownVersion(u8),
    /// The record kind is unknown.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// A string field is not UTF-8.
    #[error("{0} is not UTF-8")]
    InvalidUtf8(&'static str),
    /// A field holds a value outside its range.
    #[error("invalid {field}: {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Bytes are left after the last field.
    #[error("{0} bytes after the end of the record")]
    TrailingBytes(usize),
    /// The embedded PUBLISH did not decode.
    #[error("the stored PUBLISH does not decode: {0}")]
    Publish(#[from] DecodeError),
    /// The embedded packet is not a PUBLISH.
    #[error("the stored packet is not a PUBLISH")]
    NotAPublish,
    /// The PUBLISH could not be encoded (e.g. its packet identifier disagrees with its QoS).
    #[error("the PUBLISH cannot be stored: {0}")]
    Encode(#[from] EncodeError),
    /// A field is longer than a `u32` length can describe.
    #[error("{0} is too long to store")]
    TooLong(&'static str),
}

mod tag {
    pub(super) const SESSION_UPSERT: u8 = 1;
    pub(super) const SESSION_DELETE: u8 = 2;
    pub(super) const SUBSCRIBE: u8 = 3;
    pub(super) const UNSUBSCRIBE: u8 = 4;
    pub(super) const MESSAGE: u8 = 5;
    pub(super) const MESSAGE_DROP: u8 = 6;
    pub(super) const ENQUEUE: u8 = 7;
    pub(super) const SENT: u8 = 8;
    pub(super) const RELEASED: u8 = 9;
    pub(super) const DELIVERED: u8 = 10;
    pub(super) const AWAITING_RELEASE: u8 = 11;
    pub(super) const RELEASE_DONE: u8 = 12;
    pub(super) const RETAINED_SET: u8 = 13;
    pub(super) const RETAINED_CLEAR: u8 = 14;
    pub(super) const WILL_PENDING: u8 = 15;
    pub(super) const WILL_DONE: u8 = 16;
    pub(super) const SESSION_OPS: u8 = 17;
    pub(super) const COMPOSITE: u8 = 18;
}

impl Record {
    /// Encodes the record as one log payload.
    pub fn to_bytes(&self) -> Result<Bytes, RecordError> {
        let mut buf = BytesMut::new();
        self.encode(&mut buf)?;
        Ok(buf.freeze())
    }

    /// Appends the record's encoding to `buf`; nothing is appended on error.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), RecordError> {
        let start = buf.len();
        let result = self.encode_fields(buf);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn encode_fields(&self, buf: &mut BytesMut) -> Result<(), RecordError> {
        buf.put_u8(RECORD_VERSION);
        match self {
            Record::SessionOps { client_id, ops } => {
                buf.put_u8(tag::SESSION_OPS);
                put_str(buf, client_id)?;
                put_len(buf, ops.len(), "session operations")?;
                for op in ops {
                    put_op(buf, op);
                }
            }
            Record::Composite(records) => {
                buf.put_u8(tag::COMPOSITE);
                put_len(buf, records.len(), "a composite record")?;
                for r in records {
                    if matches!(r, Record::Composite(_)) {
                        return Err(RecordError::InvalidValue {
                            field: "a composite record",
                            value: tag::COMPOSITE.into(),
                        });
                    }
                    // A length placeholder, filled in once the record is written.
                    let at = buf.len();
                    buf.put_u32_le(0);
                    r.encode_fields(buf)?;
                    let len = u32::try_from(buf.len() - at - 4)
                        .map_err(|_| RecordError::TooLong("a composite record"))?;
                    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            Record::SessionUpsert {
                client_id,
                protocol_level,
                expiry_interval,
            } => {
                buf.put_u8(tag::SESSION_UPSERT);
                put_str(buf, client_id)?;
                buf.put_u8(*protocol_level);
                buf.put_u32_le(*expiry_interval);
            }
            Record::SessionDelete { client_id } => {
                buf.put_u8(tag::SESSION_DELETE);
                put_str(buf, client_id)?;
            }
            Record::Subscribe {
                client_id,
                filter,
                options,
                subscription_id,
            } => {
                buf.put_u8(tag::SUBSCRIBE);
                put_str(buf, client_id)?;
                put_str(buf, filter)?;
                buf.put_u8(options_byte(options));
                put_opt_u32(buf, *subscription_id);
            }
            Record::Unsubscribe { client_id, filter } => {
                buf.put_u8(tag::UNSUBSCRIBE);
                put_str(buf, client_id)?;
                put_str(buf, filter)?;
            }
            Record::Message {
                id,
                publish,
                expires_at_unix_ms,
            } => {
                buf.put_u8(tag::MESSAGE);
                buf.put_u64_le(*id);
                put_publish(buf, publish)?;
                put_opt_u64(buf, *expires_at_unix_ms);
            }
            Record::MessageDrop { id } => {
                buf.put_u8(tag::MESSAGE_DROP);
                buf.put_u64_le(*id);
            }
            Record::Enqueue {
                client_id,
                message_id,
                qos,
                retain,
                subscription_ids,
            } => {
                buf.put_u8(tag::ENQUEUE);
                put_str(buf, client_id)?;
                buf.put_u64_le(*message_id);
                buf.put_u8(qos.as_u8());
                buf.put_u8(u8::from(*retain));
                let n = u32::try_from(subscription_ids.len())
                    .map_err(|_| RecordError::TooLong("subscription identifiers"))?;
                buf.put_u32_le(n);
                for id in subscription_ids {
                    buf.put_u32_le(*id);
                }
            }
            Record::Sent {
                client_id,
                message_id,
                packet_id,
            } => {
                buf.put_u8(tag::SENT);
                put_str(buf, client_id)?;
                buf.put_u64_le(*message_id);
                buf.put_u16_le(packet_id.get());
            }
            Record::Released {
                client_id,
                message_id,
                packet_id,
            } => {
                buf.put_u8(tag::RELEASED);
                put_str(buf, client_id)?;
                buf.put_u64_le(*message_id);
                buf.put_u16_le(packet_id.get());
            }
            Record::Delivered {
                client_id,
                message_id,
            } => {
                buf.put_u8(tag::DELIVERED);
                put_str(buf, client_id)?;
                buf.put_u64_le(*message_id);
            }
            Record::AwaitingRelease {
                client_id,
                packet_id,
            } => {
                buf.put_u8(tag::AWAITING_RELEASE);
                put_str(buf, client_id)?;
                buf.put_u16_le(packet_id.get());
            }
            Record::ReleaseDone {
                client_id,
                packet_id,
            } => {
                buf.put_u8(tag::RELEASE_DONE);
                put_str(buf, client_id)?;
                buf.put_u16_le(packet_id.get());
            }
            Record::RetainedSet { topic, message_id } => {
                buf.put_u8(tag::RETAINED_SET);
                put_str(buf, topic)?;
                buf.put_u64_le(*message_id);
            }
            Record::RetainedClear { topic } => {
                buf.put_u8(tag::RETAINED_CLEAR);
                put_str(buf, topic)?;
            }
            Record::WillPending {
                client_id,
                publish,
                due_unix_ms,
            } => {
                buf.put_u8(tag::WILL_PENDING);
                put_str(buf, client_id)?;
                put_publish(buf, publish)?;
                buf.put_u64_le(*due_unix_ms);
            }
            Record::WillDone { client_id } => {
                buf.put_u8(tag::WILL_DONE);
                put_str(buf, client_id)?;
            }
        }
        Ok(())
    }

    /// Decodes one record; the bytes must hold exactly one. Strings and payloads share `bytes`.
    pub fn decode(bytes: &Bytes) -> Result<Record, RecordError> {
        let mut r = Reader {
            bytes: bytes.clone(),
        };
        let version = r.u8("the encoding version")?;
        if version != RECORD_VERSION {
            return Err(RecordError::UnknownVersion(version));
        }
        let kind = r.u8("the record kind")?;
        let record = match kind {
            tag::SESSION_UPSERT => Record::SessionUpsert {
                client_id: r.str("client_id")?,
                protocol_level: r.u8("protocol_level")?,
                expiry_interval: r.u32("expiry_interval")?,
            },
            tag::SESSION_DELETE => Record::SessionDelete {
                client_id: r.str("client_id")?,
            },
            tag::SUBSCRIBE => Record::Subscribe {
                client_id: r.str("client_id")?,
                filter: r.str("filter")?,
                options: r.options()?,
                subscription_id: r.opt_u32("subscription_id")?,
            },
            tag::UNSUBSCRIBE => Record::Unsubscribe {
                client_id: r.str("client_id")?,
                filter: r.str("filter")?,
            },
            tag::MESSAGE => Record::Message {
                id: r.u64("id")?,
                publish: r.publish()?,
                expires_at_unix_ms: r.opt_u64("expires_at_unix_ms")?,
            },
            tag::MESSAGE_DROP => Record::MessageDrop { id: r.u64("id")? },
            tag::ENQUEUE => {
                let client_id = r.str("client_id")?;
                let message_id = r.u64("message_id")?;
                let qos = r.qos()?;
                let retain = r.bool("retain")?;
                let n = r.u32("subscription_ids")? as usize;
                if n > r.bytes.len() / 4 {
                    return Err(RecordError::UnexpectedEnd("subscription_ids"));
                }
                let mut subscription_ids = Vec::with_capacity(n);
                for _ in 0..n {
                    subscription_ids.push(r.u32("subscription_ids")?);
                }
                Record::Enqueue {
                    client_id,
                    message_id,
                    qos,
                    retain,
                    subscription_ids,
                }
            }
            tag::SENT => Record::Sent {
                client_id: r.str("client_id")?,
                message_id: r.u64("message_id")?,
                packet_id: r.packet_id()?,
            },
            tag::RELEASED => Record::Released {
                client_id: r.str("client_id")?,
                message_id: r.u64("message_id")?,
                packet_id: r.packet_id()?,
            },
            tag::DELIVERED => Record::Delivered {
                client_id: r.str("client_id")?,
                message_id: r.u64("message_id")?,
            },
            tag::AWAITING_RELEASE => Record::AwaitingRelease {
                client_id: r.str("client_id")?,
                packet_id: r.packet_id()?,
            },
            tag::RELEASE_DONE => Record::ReleaseDone {
                client_id: r.str("client_id")?,
                packet_id: r.packet_id()?,
            },
            tag::RETAINED_SET => Record::RetainedSet {
                topic: r.str("topic")?,
                message_id: r.u64("message_id")?,
            },
            tag::RETAINED_CLEAR => Record::RetainedClear {
                topic: r.str("topic")?,
            },
            tag::WILL_PENDING => Record::WillPending {
                client_id: r.str("client_id")?,
                publish: r.publish()?,
                due_unix_ms: r.u64("due_unix_ms")?,
            },
            tag::WILL_DONE => Record::WillDone {
                client_id: r.str("client_id")?,
            },
            tag::SESSION_OPS => {
                let client_id = r.str("client_id")?;
                let n = r.u32("session operations")? as usize;
                // Every operation takes at least 3 bytes.
                if n > r.bytes.len() / 3 {
                    return Err(RecordError::UnexpectedEnd("session operations"));
                }
                let mut ops = Vec::with_capacity(n);
                for _ in 0..n {
                    ops.push(r.op()?);
                }
                Record::SessionOps { client_id, ops }
            }
            tag::COMPOSITE => {
                let n = r.u32("a composite record")? as usize;
                // Every part takes at least 6 bytes (length, version, kind).
                if n > r.bytes.len() / 6 {
                    return Err(RecordError::UnexpectedEnd("a composite record"));
                }
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u32("a composite record")? as usize;
                    let part = r.take(len, "a composite record")?;
                    if part.get(1) == Some(&tag::COMPOSITE) {
                        return Err(RecordError::InvalidValue {
                            field: "a composite record",
                            value: tag::COMPOSITE.into(),
                        });
                    }
                    records.push(Record::decode(&part)?);
                }
                Record::Composite(records)
            }
            other => return Err(RecordError::UnknownKind(other)),
        };
        if !r.bytes.is_empty() {
            return Err(RecordError::TrailingBytes(r.bytes.len()));
        }
        Ok(record)
    }
}

impl Record {
    /// This record as a [`SessionOp`] of its client, if it is one of the five kinds a
    /// [`Record::SessionOps`] holds.
    #[allow(clippy::result_large_err)] // gives the record back unboxed: no allocation per record
    pub fn into_session_op(self) -> Result<(MqttStr, SessionOp), Record> {
        Ok(match self {
            Record::Sent {
                client_id,
                message_id,
                packet_id,
            } => (
                client_id,
                SessionOp::Sent {
                    message_id,
                    packet_id,
                },
            ),
            Record::Released {
                client_id,
                message_id,
                packet_id,
            } => (
                client_id,
                SessionOp::Released {
                    message_id,
                    packet_id,
                },
            ),
            Record::Delivered {
                client_id,
                message_id,
            } => (client_id, SessionOp::Delivered { message_id }),
            Record::AwaitingRelease {
                client_id,
                packet_id,
            } => (client_id, SessionOp::AwaitingRelease { packet_id }),
            Record::ReleaseDone {
                client_id,
                packet_id,
            } => (client_id, SessionOp::ReleaseDone { packet_id }),
            other => return Err(other),
        })
    }

    /// The largest id of a message this record stores, looking inside a
    /// [`Record::Composite`]: where the broker's next message id starts after a replay.
    pub fn max_message_id(&self) -> Option<u64> {
        match self {
            Record::Message { id, .. } => Some(*id),
            Record::Composite(parts) => parts.iter().filter_map(Record::max_message_id).max(),
            _ => None,
        }
    }

    /// The records of one append as one record that replays to the same state: the session
    /// operations of each client gathered into [`Record::SessionOps`] (an operation joins an
    /// earlier group of its client only when nothing in between could change its effect), and
    /// the whole wrapped in a [`Record::Composite`] when more than one record is left. `None`
    /// for no records.
    pub fn pack(records: Vec<Record>) -> Option<Record> {
        // Linear in the records (it runs under the store lock): at most one group per client
        // is open, and whether an operation may join it is read off the records pushed since
        // it began, not kept per group (that cost a scan of every group's blocked ids per
        // operation, cubic in the PUBLISHes of one socket read).
        let mut out: Vec<Record> = Vec::with_capacity(records.len());
        // The open group of each client that has one: its index in `out`.
        let mut open: Vec<usize> = Vec::new();
        // Records that operations naming their message may not move before: (index in
        // `out`, message id), in `out` order.
        let mut blocks: Vec<(usize, u64)> = Vec::new();
        // The last retained record's index in `out`: no operation naming a message moves
        // before it.
        let mut last_retained: Option<usize> = None;
        let of_client = |r: &Record, client: &MqttStr| matches!(r, Record::SessionOps { client_id: c, .. } if c == client);
        for r in records {
            let r = match r.into_session_op() {
                Ok((client_id, op)) => {
                    let slot = open.iter().position(|&at| of_client(&out[at], &client_id));
                    let joinable = slot.map(|i| open[i]).filter(|&at| match op.message_id() {
                        None => true,
                        Some(m) => {
                            last_retained.is_none_or(|r| r < at)
                                && !blocks
                                    .iter()
                                    .rev()
                                    .take_while(|&&(i, _)| i > at)
                                    .any(|&(_, id)| id == m)
                        }
                    });
                    match joinable {
                        Some(at) => {
                            if let Some(Record::SessionOps { ops, .. }) = out.get_mut(at) {
                                ops.push(op);
                            }
                        }
                        None => {
                            // Later operations of this client go to the new group.
                            let at = out.len();
                            match slot {
                                Some(i) => open[i] = at,
                                None => open.push(at),
                            }
                            out.push(Record::SessionOps {
                                client_id,
                                ops: vec![op],
                            });
                        }
                    }
                    continue;
                }
                Err(r) => r,
            };
            // What operations may no longer move before `r`.
            let (client, message): (Option<&MqttStr>, Option<u64>) = match &r {
                Record::SessionUpsert { client_id, .. }
                | Record::SessionDelete { client_id }
                | Record::Subscribe { client_id, .. }
                | Record::Unsubscribe { client_id, .. }
                | Record::WillPending { client_id, .. }
                | Record::WillDone { client_id } => (Some(client_id), None),
                Record::Enqueue {
                    client_id,
                    message_id,
                    ..
                } => (Some(client_id), Some(*message_id)),
                Record::Message { id, .. } | Record::MessageDrop { id } => (None, Some(*id)),
                Record::RetainedSet { message_id, .. } => (None, Some(*message_id)),
                _ => (None, None),
            };
            let at = out.len();
            if matches!(r, Record::SessionOps { .. } | Record::Composite(_)) {
                open.clear();
            } else if let Some(c) = client {
                open.retain(|&g| !of_client(&out[g], c));
            }
            if let Some(m) = message {
                blocks.push((at, m));
            }
            if matches!(r, Record::RetainedSet { .. } | Record::RetainedClear { .. }) {
                last_retained = Some(at);
            }
            out.push(r);
        }
        match out.len() {
            0 => None,
            1 => out.pop(),
            _ => Some(Record::Composite(out)),
        }
    }
}

fn put_len(buf: &mut BytesMut, len: usize, field: &'static str) -> Result<(), RecordError> {
    let len = u32::try_from(len).map_err(|_| RecordError::TooLong(field))?;
    buf.put_u32_le(len);
    Ok(())
}

fn put_str(buf: &mut BytesMut, s: &MqttStr) -> Result<(), RecordError> {
    put_len(buf, s.len(), "a string")?;
    buf.put_slice(s.as_bytes());
    Ok(())
}

fn put_opt_u32(buf: &mut BytesMut, v: Option<u32>) {
    match v {
        Some(v) => {
            buf.put_u8(1);
            buf.put_u32_le(v);
        }
        None => buf.put_u8(0),
    }
}

fn put_opt_u64(buf: &mut BytesMut, v: Option<u64>) {
    match v {
        Some(v) => {
            buf.put_u8(1);
            buf.put_u64_le(v);
        }
        None => buf.put_u8(0),
    }
}

/// The PUBLISH packet (5.0) behind its length: sized and written in one pass, the length
/// filled in after, without cloning the message into a `Packet`.
fn put_publish(buf: &mut BytesMut, publish: &Publish) -> Result<(), RecordError> {
    let start = buf.len();
    buf.put_u32_le(0);
    let len = match qosmos_mqtt::encode_publish(publish, ProtocolVersion::V5, buf) {
        Ok(len) => len,
        Err(e) => {
            buf.truncate(start);
            return Err(e.into());
        }
    };
    let len = u32::try_from(len).map_err(|_| {
        buf.truncate(start);
        RecordError::TooLong("the PUBLISH")
    })?;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn put_op(buf: &mut BytesMut, op: &SessionOp) {
    match *op {
        SessionOp::Sent {
            message_id,
            packet_id,
        } => {
            buf.put_u8(tag::SENT);
            buf.put_u64_le(message_id);
            buf.put_u16_le(packet_id.get());
        }
        SessionOp::Released {
            message_id,
            packet_id,
        } => {
            buf.put_u8(tag::RELEASED);
            buf.put_u64_le(message_id);
            buf.put_u16_le(packet_id.get());
        }
        SessionOp::Delivered { message_id } => {
            buf.put_u8(tag::DELIVERED);
            buf.put_u64_le(message_id);
        }
        SessionOp::AwaitingRelease { packet_id } => {
            buf.put_u8(tag::AWAITING_RELEASE);
            buf.put_u16_le(packet_id.get());
        }
        SessionOp::ReleaseDone { packet_id } => {
            buf.put_u8(tag::RELEASE_DONE);
            buf.put_u16_le(packet_id.get());
        }
    }
}

/// The options as the SUBSCRIBE options byte of MQTT 5.0.
fn options_byte(o: &SubscriptionOptions) -> u8 {
    o.qos.as_u8()
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

/// A cursor over a record's bytes.
struct Reader {
    bytes: Bytes,
}

impl Reader {
    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, RecordError> {
        if self.bytes.len() < n {
            return Err(RecordError::UnexpectedEnd(field));
        }
        Ok(self.bytes.split_to(n))
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let b = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RecordError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, RecordError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(RecordError::InvalidValue {
                field,
                value: v.into(),
            }),
        }
    }

    fn opt_u32(&mut self, field: &'static str) -> Result<Option<u32>, RecordError> {
        Ok(if self.bool(field)? {
            Some(self.u32(field)?)
        } else {
            None
        })
    }

    fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, RecordError> {
        Ok(if self.bool(field)? {
            Some(self.u64(field)?)
        } else {
            None
        })
    }

    fn str(&mut self, field: &'static str) -> Result<MqttStr, RecordError> {
        let n = self.u32(field)? as usize;
        let b = self.take(n, field)?;
        MqttStr::from_utf8(b).map_err(|_| RecordError::InvalidUtf8(field))
    }

    fn qos(&mut self) -> Result<QoS, RecordError> {
        let v = self.u8("qos")?;
        QoS::from_u8(v).ok_or(RecordError::InvalidValue {
            field: "qos",
            value: v.into(),
        })
    }

    fn packet_id(&mut self) -> Result<PacketId, RecordError> {
        let v = self.u16("packet_id")?;
        PacketId::new(v).ok_or(RecordError::InvalidValue {
            field: "packet_id",
            value: 0,
        })
    }

    fn op(&mut self) -> Result<SessionOp, RecordError> {
        Ok(match self.u8("a session operation")? {
            tag::SENT => SessionOp::Sent {
                message_id: self.u64("message_id")?,
                packet_id: self.packet_id()?,
            },
            tag::RELEASED => SessionOp::Released {
                message_id: self.u64("message_id")?,
                packet_id: self.packet_id()?,
            },
            tag::DELIVERED => SessionOp::Delivered {
                message_id: self.u64("message_id")?,
            },
            tag::AWAITING_RELEASE => SessionOp::AwaitingRelease {
                packet_id: self.packet_id()?,
            },
            tag::RELEASE_DONE => SessionOp::ReleaseDone {
                packet_id: self.packet_id()?,
            },
            other => {
                return Err(RecordError::InvalidValue {
                    field: "a session operation",
                    value: other.into(),
                });
            }
        })
    }

    fn options(&mut self) -> Result<SubscriptionOptions, RecordError> {
        let b = self.u8("options")?;
        let invalid = RecordError::InvalidValue {
            field: "options",
            value: b.into(),
        };
        let qos = QoS::from_u8(b & 0b11).ok_or(invalid.clone())?;
        let retain_handling = match (b >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(invalid),
        };
        if b & 0b1100_0000 != 0 {
            return Err(invalid);
        }
        Ok(SubscriptionOptions {
            qos,
            no_local: b & 0b100 != 0,
            retain_as_published: b & 0b1000 != 0,
            retain_handling,
        })
    }

    fn publish(&mut self) -> Result<Publish, RecordError> {
        let n = self.u32("the PUBLISH")? as usize;
        let b = self.take(n, "the PUBLISH")?;
        // Role::Client: a PUBLISH carrying subscription identifiers is one a server sends.
        match qosmos_mqtt::decode_packet(&b, Role::Client, Some(ProtocolVersion::V5))? {
            Packet::Publish(p) => Ok(p),
            _ => Err(RecordError::NotAPublish),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// [`Record::pack`] as it was before it was made linear (it scanned every group's blocked
    /// ids per operation): the reference the packing of today must agree with.
    pub(crate) fn pack_before(records: Vec<Record>) -> Option<Record> {
        struct Group {
            /// Index in `out`.
            at: usize,
            closed: bool,
            /// Operations naming a message may not move before these records.
            blocked_ids: Vec<u64>,
            no_message_ops: bool,
        }
        let mut out: Vec<Record> = Vec::with_capacity(records.len());
        let mut groups: Vec<Group> = Vec::new();
        for r in records {
            let r = match r.into_session_op() {
                Ok((client_id, op)) => {
                    let mid = op.message_id();
                    let open = groups.iter().rev().find(|g| {
                        !g.closed
                            && matches!(&out[g.at], Record::SessionOps { client_id: c, .. } if *c == client_id)
                            && mid.is_none_or(|m| !g.no_message_ops && !g.blocked_ids.contains(&m))
                    });
                    match open.map(|g| g.at) {
                        Some(at) => {
                            if let Some(Record::SessionOps { ops, .. }) = out.get_mut(at) {
                                ops.push(op);
                            }
                        }
                        None => {
                            // Later operations of this client go to the new group.
                            for g in &mut groups {
                                if matches!(&out[g.at], Record::SessionOps { client_id: c, .. } if *c == client_id)
                                {
                                    g.closed = true;
                                }
                            }
                            groups.push(Group {
                                at: out.len(),
                                closed: false,
                                blocked_ids: Vec::new(),
                                no_message_ops: false,
                            });
                            out.push(Record::SessionOps {
                                client_id,
                                ops: vec![op],
                            });
                        }
                    }
                    continue;
                }
                Err(r) => r,
            };
            // What operations may no longer move before `r`.
            let (client, message): (Option<&MqttStr>, Option<u64>) = match &r {
                Record::SessionUpsert { client_id, .. }
                | Record::SessionDelete { client_id }
                | Record::Subscribe { client_id, .. }
                | Record::Unsubscribe { client_id, .. }
                | Record::WillPending { client_id, .. }
                | Record::WillDone { client_id } => (Some(client_id), None),
                Record::Enqueue {
                    client_id,
                    message_id,
                    ..
                } => (Some(client_id), Some(*message_id)),
                Record::Message { id, .. } | Record::MessageDrop { id } => (None, Some(*id)),
                Record::RetainedSet { message_id, .. } => (None, Some(*message_id)),
                _ => (None, None),
            };
            let everything = matches!(r, Record::SessionOps { .. } | Record::Composite(_));
            let retained = matches!(r, Record::RetainedSet { .. } | Record::RetainedClear { .. });
            for g in &mut groups {
                let Some(Record::SessionOps { client_id: c, .. }) = out.get(g.at) else {
                    continue;
                };
                if everything || client == Some(c) {
                    g.closed = true;
                }
                if let Some(m) = message {
                    g.blocked_ids.push(m);
                }
                g.no_message_ops |= retained;
            }
            out.push(r);
        }
        match out.len() {
            0 => None,
            1 => out.pop(),
            _ => Some(Record::Composite(out)),
        }
    }
    use qosmos_mqtt::{Properties, Property};

    fn text() -> impl Strategy<Value = MqttStr> {
        "[a-zA-Z0-9 é漢/_+#-]{0,12}".prop_map(MqttStr::from)
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    fn pid() -> impl Strategy<Value = PacketId> {
        (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
    }

    fn publish() -> impl Strategy<Value = Publish> {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            "[a-z0-9]{1,6}(/[a-z0-9]{0,6}){0,3}",
            pid(),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::option::of(any::<u32>()),
            prop::collection::vec(1u32..=268_435_455, 0..3),
            prop::option::of((text(), text())),
        )
            .prop_map(
                |(qos, dup, retain, topic, pid, payload, expiry, sub_ids, user)| {
                    let mut properties = Properties::new();
                    if let Some(e) = expiry {
                        properties.push(Property::MessageExpiryInterval(e));
                    }
                    for id in sub_ids {
                        properties.push(Property::SubscriptionIdentifier(id));
                    }
                    if let Some((k, v)) = user {
                        properties.push(Property::UserProperty(k, v));
                    }
                    Publish {
                        dup: dup && qos != QoS::AtMostOnce,
                        qos,
                        retain,
                        topic: MqttStr::from(topic),
                        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
                        payload: Bytes::from(payload),
                        properties,
                    }
                },
            )
    }

    fn options() -> impl Strategy<Value = SubscriptionOptions> {
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(|(qos, nl, rap, rh)| {
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        })
    }

    pub(crate) fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (text(), any::<u8>(), any::<u32>()).prop_map(|(c, p, e)| Record::SessionUpsert {
                client_id: c,
                protocol_level: p,
                expiry_interval: e
            }),
            text().prop_map(|c| Record::SessionDelete { client_id: c }),
            (text(), text(), options(), prop::option::of(any::<u32>())).prop_map(|(c, f, o, s)| {
                Record::Subscribe {
                    client_id: c,
                    filter: f,
                    options: o,
                    subscription_id: s,
                }
            }),
            (text(), text()).prop_map(|(c, f)| Record::Unsubscribe {
                client_id: c,
                filter: f
            }),
            (any::<u64>(), publish(), prop::option::of(any::<u64>())).prop_map(|(i, p, e)| {
                Record::Message {
                    id: i,
                    publish: p,
                    expires_at_unix_ms: e,
                }
            }),
            any::<u64>().prop_map(|id| Record::MessageDrop { id }),
            (
                text(),
                any::<u64>(),
                qos(),
                any::<bool>(),
                prop::collection::vec(any::<u32>(), 0..4)
            )
                .prop_map(|(c, m, q, r, s)| Record::Enqueue {
                    client_id: c,
                    message_id: m,
                    qos: q,
                    retain: r,
                    subscription_ids: s
                }),
            (text(), any::<u64>(), pid()).prop_map(|(c, m, p)| Record::Sent {
                client_id: c,
                message_id: m,
                packet_id: p
            }),
            (text(), any::<u64>(), pid()).prop_map(|(c, m, p)| Record::Released {
                client_id: c,
                message_id: m,
                packet_id: p
            }),
            (text(), any::<u64>()).prop_map(|(c, m)| Record::Delivered {
                client_id: c,
                message_id: m
            }),
            (text(), pid()).prop_map(|(c, p)| Record::AwaitingRelease {
                client_id: c,
                packet_id: p
            }),
            (text(), pid()).prop_map(|(c, p)| Record::ReleaseDone {
                client_id: c,
                packet_id: p
            }),
            (text(), any::<u64>()).prop_map(|(t, m)| Record::RetainedSet {
                topic: t,
                message_id: m
            }),
            text().prop_map(|t| Record::RetainedClear { topic: t }),
            (text(), publish(), any::<u64>()).prop_map(|(c, p, d)| Record::WillPending {
                client_id: c,
                publish: p,
                due_unix_ms: d
            }),
            text().prop_map(|c| Record::WillDone { client_id: c }),
        ]
    }

    fn op() -> impl Strategy<Value = SessionOp> {
        prop_oneof![
            (any::<u64>(), pid()).prop_map(|(m, p)| SessionOp::Sent {
                message_id: m,
                packet_id: p
            }),
            (any::<u64>(), pid()).prop_map(|(m, p)| SessionOp::Released {
                message_id: m,
                packet_id: p
            }),
            any::<u64>().prop_map(|m| SessionOp::Delivered { message_id: m }),
            pid().prop_map(|p| SessionOp::AwaitingRelease { packet_id: p }),
            pid().prop_map(|p| SessionOp::ReleaseDone { packet_id: p }),
        ]
    }

    /// Every kind, the packed ones included.
    fn any_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            4 => record(),
            1 => (text(), prop::collection::vec(op(), 0..6))
                .prop_map(|(c, ops)| Record::SessionOps { client_id: c, ops }),
            1 => prop::collection::vec(record(), 0..5).prop_map(Record::Composite),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn decode_inverts_encode(r in any_record()) {
            let bytes = r.to_bytes().unwrap();
            prop_assert_eq!(Record::decode(&bytes).unwrap(), r);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..96)) {
            let _ = Record::decode(&Bytes::from(b));
        }

        #[test]
        fn mutated_records_never_panic(r in any_record(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut b = r.to_bytes().unwrap().to_vec();
            let i = at.index(b.len());
            b[i] = byte;
            let _ = Record::decode(&Bytes::from(b.clone()));
            b.truncate(cut.index(b.len() + 1));
            let _ = Record::decode(&Bytes::from(b));
        }
    }

    #[test]
    fn strict_decode_refuses_trailing_bytes_and_unknown_kinds() {
        let mut b = Record::WillDone {
            client_id: "c".into(),
        }
        .to_bytes()
        .unwrap()
        .to_vec();
        b.push(0);
        assert_eq!(
            Record::decode(&Bytes::from(b)),
            Err(RecordError::TrailingBytes(1))
        );
        assert_eq!(
            Record::decode(&Bytes::from_static(&[RECORD_VERSION, 200])),
            Err(RecordError::UnknownKind(200))
        );
        assert_eq!(
            Record::decode(&Bytes::from_static(&[9, 1])),
            Err(RecordError::UnknownVersion(9))
        );
    }

    #[test]
    fn a_nested_composite_is_refused_both_ways() {
        let inner = Record::Composite(vec![Record::WillDone {
            client_id: "c".into(),
        }]);
        let nested = Record::Composite(vec![inner.clone()]);
        assert!(matches!(
            nested.to_bytes(),
            Err(RecordError::InvalidValue { .. })
        ));
        // Hand-made: a composite holding the encoding of a composite.
        let part = inner.to_bytes().unwrap();
        let mut b = BytesMut::new();
        b.put_u8(RECORD_VERSION);
        b.put_u8(tag::COMPOSITE);
        b.put_u32_le(1);
        b.put_u32_le(part.len() as u32);
        b.put_slice(&part);
        assert!(matches!(
            Record::decode(&b.freeze()),
            Err(RecordError::InvalidValue { .. })
        ));
    }

    #[test]
    fn pack_names_each_client_once_and_wraps_the_rest() {
        let (a, b) = (MqttStr::from("a"), MqttStr::from("b"));
        let p = |v| PacketId::new(v).unwrap();
        let packed = Record::pack(vec![
            Record::AwaitingRelease {
                client_id: a.clone(),
                packet_id: p(1),
            },
            Record::Message {
                id: 1,
                publish: Publish::new("t", &b"x"[..]),
                expires_at_unix_ms: None,
            },
            Record::Enqueue {
                client_id: b.clone(),
                message_id: 1,
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: vec![],
            },
            Record::AwaitingRelease {
                client_id: a.clone(),
                packet_id: p(2),
            },
            // Names message 1, which was stored after the group began: a group of its own.
            Record::Delivered {
                client_id: a.clone(),
                message_id: 1,
            },
        ])
        .unwrap();
        let Record::Composite(parts) = packed else {
            panic!("not a composite: {packed:?}");
        };
        assert_eq!(parts.len(), 4);
        assert_eq!(
            parts[0],
            Record::SessionOps {
                client_id: a.clone(),
                ops: vec![
                    SessionOp::AwaitingRelease { packet_id: p(1) },
                    SessionOp::AwaitingRelease { packet_id: p(2) }
                ]
            }
        );
        assert_eq!(
            parts[3],
            Record::SessionOps {
                client_id: a,
                ops: vec![SessionOp::Delivered { message_id: 1 }]
            }
        );
        // The broker's next message id must come after the one inside the composite.
        assert_eq!(Record::Composite(parts.clone()).max_message_id(), Some(1));
        // One record stays itself; none is nothing.
        let one = Record::WillDone { client_id: b };
        assert_eq!(Record::pack(vec![one.clone()]), Some(one));
        assert_eq!(Record::pack(vec![]), None);
    }

    #[test]
    fn a_publish_whose_packet_id_disagrees_with_its_qos_is_refused_on_encode() {
        let mut p = Publish::new("t", &b"x"[..]);
        p.qos = QoS::AtLeastOnce;
        let r = Record::Message {
            id: 1,
            publish: p,
            expires_at_unix_ms: None,
        };
        assert!(matches!(r.to_bytes(), Err(RecordError::Encode(_))));
    }
}
