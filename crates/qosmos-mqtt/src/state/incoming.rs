//! The receiving side of QoS 0, 1 and 2: acknowledgements, duplicate detection, Receive Maximum.

use super::error::StateError;
use super::packet_ids::IdMap;
use crate::packet::{Packet, PacketId, PacketType, PubAck, PubComp, PubRec, PubRel, Publish};
use crate::qos::QoS;
use crate::reason::ReasonCode;
use crate::version::ProtocolVersion;
use std::collections::VecDeque;

/// When QoS 1 and 2 messages are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// PUBACK / PUBREC are queued as soon as the PUBLISH is handled.
    #[default]
    Automatic,
    /// PUBACK / PUBREC wait for [`Incoming::ack`]: the client acknowledges once the handler has
    /// returned, the broker once the message is durable. Until then a resent PUBLISH is not
    /// delivered again and is not answered.
    Manual,
}

/// Settings of an [`Incoming`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingConfig {
    /// Our Receive Maximum: the most QoS 1 and 2 exchanges the peer may leave unacknowledged.
    /// Advertise the same value in CONNECT / CONNACK.
    pub receive_maximum: u16,
    /// When messages are acknowledged.
    pub ack_mode: AckMode,
    /// Accept a PUBREL for a QoS 2 message the application has not acknowledged yet (manual
    /// mode), instead of failing with [`StateError::UnexpectedPacket`]. The sender broke the
    /// protocol (it cannot have seen our PUBREC), but it now holds the message as delivered,
    /// and a strict receiver that disconnects meets the same PUBREL on every reconnect. With
    /// this set, the exchange ends with PUBCOMP once the application acknowledges, and the
    /// message stays delivered exactly once. A client wants this; a broker, strict with its
    /// clients, does not. Default: off.
    pub accept_early_pubrel: bool,
}

impl Default for IncomingConfig {
    /// Receive Maximum 65535, automatic acknowledgement.
    fn default() -> Self {
        IncomingConfig {
            receive_maximum: u16::MAX,
            ack_mode: AckMode::Automatic,
            accept_early_pubrel: false,
        }
    }
}

impl IncomingConfig {
    /// Sets [`IncomingConfig::receive_maximum`].
    pub fn receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = n;
        self
    }

    /// Sets [`IncomingConfig::ack_mode`].
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// Sets [`IncomingConfig::accept_early_pubrel`].
    pub fn accept_early_pubrel(mut self, accept: bool) -> Self {
        self.accept_early_pubrel = accept;
        self
    }
}

/// Counters for metrics. They only ever grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct IncomingStats {
    /// Messages handed to the application (each at most once for QoS 2).
    pub delivered: u64,
    /// Resent PUBLISH packets recognised and not delivered again.
    pub duplicates: u64,
    /// Acknowledgements with a failure reason code (manual mode).
    pub refused: u64,
    /// PUBREL packets for identifiers with no exchange, answered with Packet Identifier not found.
    pub unknown_pubrel: u64,
    /// PUBREL packets that came before our PUBREC (see [`IncomingConfig::accept_early_pubrel`]).
    pub early_pubrel: u64,
}

/// What an incoming exchange waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Handed to the application, which has not acknowledged it yet (manual mode).
    AwaitingAck(QoS),
    /// Acknowledged before the PUBLISH was seen on this connection; the PUBACK, or the failed
    /// PUBREC, goes out when the peer resends the PUBLISH (it always does on a resumed session).
    /// Answering earlier would let the resend, still on its way, look like a new message.
    ResponseOwed(QoS, ReasonCode),
    /// QoS 2: PUBREC sent (or owed), waiting for PUBREL.
    AwaitingPubRel,
    /// QoS 2, manual mode: the peer sent PUBREL before the application acknowledged (and so
    /// before our PUBREC); the acknowledgement answers with PUBCOMP.
    ReleasedEarly,
}

impl Stage {
    fn qos(self) -> QoS {
        match self {
            Stage::AwaitingAck(q) | Stage::ResponseOwed(q, _) => q,
            Stage::AwaitingPubRel | Stage::ReleasedEarly => QoS::ExactlyOnce,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exchange {
    stage: Stage,
    /// Its PUBLISH arrived on the current connection: it counts against Receive Maximum, whose
    /// quota starts afresh with each connection [MQTT 4.9].
    seen: bool,
}

/// The receiver of PUBLISH packets, for one session: acknowledges them, hands each QoS 2 message
/// to the application exactly once, and enforces our Receive Maximum.
///
/// QoS 2 messages are delivered on PUBLISH (method A of the specification's figure 4.3): the
/// identifier is then remembered until PUBREL, and a resent PUBLISH with it is answered but not
/// delivered again.
///
/// # Calling contract
///
/// An `Incoming` starts disconnected. For each connection:
///
/// 1. Once CONNACK is sent or received, call [`Incoming::resume`] with the session present flag.
/// 2. Feed PUBLISH to [`Incoming::handle_publish`] and give the application what it returns;
///    feed PUBREL to [`Incoming::handle_pubrel`]. In [`AckMode::Manual`], call
///    [`Incoming::ack`] once the application is done with a QoS 1 or 2 message.
/// 3. After any of these calls, drain [`Incoming::poll_transmit`] and write the packets out.
/// 4. When the connection ends, call [`Incoming::on_disconnect`].
///
/// # Example
///
/// ```
/// use qosmos_mqtt::state::{Incoming, IncomingConfig};
/// use qosmos_mqtt::{Packet, PacketId, ProtocolVersion, PubRel, Publish, QoS};
///
/// let mut inc = Incoming::new(ProtocolVersion::V5, IncomingConfig::default());
/// inc.resume(true);
/// let pid = PacketId::new(7).expect("non-zero");
/// let mut p = Publish::new("orders/42", "created");
/// p.qos = QoS::ExactlyOnce;
/// p.packet_id = Some(pid);
/// assert!(inc.handle_publish(p.clone())?.is_some()); // delivered
/// assert!(matches!(inc.poll_transmit(), Some(Packet::PubRec(_))));
/// p.dup = true;
/// assert!(inc.handle_publish(p)?.is_none()); // a resend: not delivered again
/// assert!(matches!(inc.poll_transmit(), Some(Packet::PubRec(_))));
/// inc.handle_pubrel(&PubRel::new(pid))?;
/// assert!(matches!(inc.poll_transmit(), Some(Packet::PubComp(_))));
/// # Ok::<(), qosmos_mqtt::state::StateError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Incoming {
    version: ProtocolVersion,
    config: IncomingConfig,
    connected: bool,
    /// Exchanges with `seen` set.
    in_window: usize,
    /// Allocated by the first count: a broker holds an `Incoming` per session, and most of an
    /// idle session's memory is what it holds inline.
    stats: Option<Box<IncomingStats>>,
    /// The exchanges and replies, allocated by the first QoS 1 or 2 message: a broker holds an
    /// `Incoming` per session, and many sessions never publish.
    q: Option<Box<Queues>>,
}

/// What an [`Incoming`] tracks and queues.
#[derive(Debug, Clone, Default)]
struct Queues {
    exchanges: IdMap<Exchange>,
    transmit: VecDeque<Packet>,
}

impl Incoming {
    /// A disconnected receiver for a connection of this protocol version.
    pub fn new(version: ProtocolVersion, config: IncomingConfig) -> Incoming {
        Incoming {
            version,
            config,
            connected: false,
            in_window: 0,
            stats: None,
            q: None,
        }
    }

    /// The queues, allocated if need be.
    fn queues(&mut self) -> &mut Queues {
        self.q.get_or_insert_with(Default::default)
    }

    fn exchange(&self, packet_id: PacketId) -> Option<&Exchange> {
        self.q.as_deref()?.exchanges.get(&packet_id)
    }

    /// Handles a PUBLISH. Returns the message to hand to the application, or `None` when it is
    /// a resend of one already handed over. Responses are queued for [`Incoming::poll_transmit`].
    ///
    /// - QoS 0: delivered.
    /// - QoS 1: delivered, PUBACK queued (automatic mode). A QoS 1 message is "at least once":
    ///   after its PUBACK, a resend is a new message and is delivered again.
    /// - QoS 2: delivered once, the identifier remembered, PUBREC queued (automatic mode). A
    ///   PUBLISH with an identifier awaiting PUBREL, DUP or not, only gets PUBREC again.
    ///
    /// Receive Maximum counts, per connection as the specification's send quota does, the
    /// PUBLISH packets received on this connection not yet answered with PUBACK or PUBCOMP.
    ///
    /// # Errors
    ///
    /// [`StateError::ReceiveMaximumExceeded`] for a QoS 1 or 2 PUBLISH beyond Receive Maximum;
    /// [`StateError::PacketIdInUse`] when the identifier is held by an exchange of the other
    /// QoS; [`StateError::PacketIdMismatch`] for a QoS that does not fit the presence of an
    /// identifier. Nothing is delivered or queued.
    pub fn handle_publish(&mut self, publish: Publish) -> Result<Option<Publish>, StateError> {
        let qos = publish.qos;
        let packet_id = match (qos, publish.packet_id) {
            (QoS::AtMostOnce, None) => {
                self.count().delivered += 1;
                return Ok(Some(publish));
            }
            (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) => id,
            _ => return Err(StateError::PacketIdMismatch { qos }),
        };
        let existing = self.exchange(packet_id).copied();
        if let Some(ex) = existing
            && ex.stage.qos() != qos
        {
            return Err(StateError::PacketIdInUse { packet_id, qos });
        }
        if !existing.is_some_and(|ex| ex.seen)
            && self.in_window >= usize::from(self.config.receive_maximum)
        {
            return Err(StateError::ReceiveMaximumExceeded {
                maximum: self.config.receive_maximum,
            });
        }
        let Some(ex) = existing else {
            match (self.config.ack_mode, qos) {
                (AckMode::Manual, _) => self.open(packet_id, Stage::AwaitingAck(qos)),
                (AckMode::Automatic, QoS::AtLeastOnce) => {
                    self.send(Packet::PubAck(PubAck::new(packet_id)));
                }
                (AckMode::Automatic, _) => {
                    self.open(packet_id, Stage::AwaitingPubRel);
                    self.send(Packet::PubRec(PubRec::new(packet_id)));
                }
            }
            self.count().delivered += 1;
            return Ok(Some(publish));
        };
        self.count().duplicates += 1;
        self.mark_seen(packet_id);
        match ex.stage {
            Stage::AwaitingAck(_) => {}
            Stage::ResponseOwed(_, reason) => {
                self.close(packet_id);
                self.respond(qos, packet_id, reason);
            }
            Stage::AwaitingPubRel => self.send(Packet::PubRec(PubRec::new(packet_id))),
            // Released already: the peer should not resend; the acknowledgement answers.
            Stage::ReleasedEarly => {}
        }
        Ok(None)
    }

    /// Acknowledges a QoS 1 or 2 message in [`AckMode::Manual`] with success.
    ///
    /// # Errors
    ///
    /// See [`Incoming::ack_with`].
    pub fn ack(&mut self, packet_id: PacketId) -> Result<(), StateError> {
        self.ack_with(packet_id, ReasonCode::SUCCESS)
    }

    /// Acknowledges a QoS 1 or 2 message in [`AckMode::Manual`] with a reason code: PUBACK for
    /// QoS 1; PUBREC for QoS 2, which then awaits PUBREL, or with a code of 0x80 or more ends the
    /// exchange (the message is refused; a resend will be delivered again). MQTT 3.1.1 has no
    /// reason codes: there every acknowledgement is a success, and a caller that must refuse a
    /// message closes the connection instead.
    ///
    /// When the message arrived on an earlier connection (or we are disconnected), the response
    /// is owed and sent when the peer resends the PUBLISH, which it does on a resumed session.
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdNotFound`] when no delivered message awaits an acknowledgement
    /// with this identifier (already acknowledged, or forgotten with the session): ignore it.
    pub fn ack_with(&mut self, packet_id: PacketId, reason: ReasonCode) -> Result<(), StateError> {
        if let Some(Exchange {
            stage: Stage::ReleasedEarly,
            ..
        }) = self.exchange(packet_id).copied()
        {
            // The peer counts the message delivered: a refusal can no longer be said.
            if !reason.is_success() {
                self.count().refused += 1;
            }
            if self.connected {
                self.close(packet_id);
                self.send(Packet::PubComp(PubComp::new(packet_id)));
            } else {
                // The peer resends PUBREL on the next connection; answer that one.
                self.set_stage(packet_id, Stage::AwaitingPubRel);
            }
            return Ok(());
        }
        let Some(Exchange {
            stage: Stage::AwaitingAck(qos),
            seen,
        }) = self.exchange(packet_id).copied()
        else {
            return Err(StateError::PacketIdNotFound {
                packet: PacketType::Publish,
                packet_id,
            });
        };
        let reason = match self.version {
            ProtocolVersion::V311 => ReasonCode::SUCCESS,
            ProtocolVersion::V5 => reason,
        };
        if !reason.is_success() {
            self.count().refused += 1;
        }
        if qos == QoS::ExactlyOnce && reason.is_success() {
            self.set_stage(packet_id, Stage::AwaitingPubRel);
            if seen {
                // A success code other than 0x00 (No matching subscribers) is worth passing on.
                let mut rec = PubRec::new(packet_id);
                rec.reason_code = reason;
                self.send(Packet::PubRec(rec));
            }
        } else if seen {
            self.close(packet_id);
            self.respond(qos, packet_id, reason);
        } else {
            self.set_stage(packet_id, Stage::ResponseOwed(qos, reason));
        }
        Ok(())
    }

    /// Handles a PUBREL: forgets the identifier and queues PUBCOMP. For an identifier with no
    /// exchange (the PUBCOMP was lost and PUBREL resent), PUBCOMP carries Packet Identifier not
    /// found under 5.0, success under 3.1.1.
    ///
    /// # Errors
    ///
    /// [`StateError::UnexpectedPacket`] when the identifier's exchange has not sent PUBREC
    /// (unless [`IncomingConfig::accept_early_pubrel`] is set and it awaits the application).
    pub fn handle_pubrel(&mut self, rel: &PubRel) -> Result<(), StateError> {
        let packet_id = rel.packet_id;
        match self.exchange(packet_id).map(|ex| ex.stage) {
            Some(Stage::AwaitingPubRel) => {
                self.close(packet_id);
                self.send(Packet::PubComp(PubComp::new(packet_id)));
                Ok(())
            }
            Some(Stage::AwaitingAck(QoS::ExactlyOnce)) if self.config.accept_early_pubrel => {
                self.count().early_pubrel += 1;
                self.set_stage(packet_id, Stage::ReleasedEarly);
                Ok(())
            }
            // Resent after a reconnect: still waiting for the application.
            Some(Stage::ReleasedEarly) => Ok(()),
            Some(stage) => Err(StateError::UnexpectedPacket {
                packet: PacketType::PubRel,
                packet_id,
                expected: if stage.qos() == QoS::AtLeastOnce {
                    PacketType::PubAck
                } else {
                    PacketType::PubRec
                },
            }),
            None => {
                self.count().unknown_pubrel += 1;
                let mut comp = PubComp::new(packet_id);
                if self.version == ProtocolVersion::V5 {
                    comp.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(Packet::PubComp(comp));
                Ok(())
            }
        }
    }

    /// The next packet to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.q.as_deref_mut()?.transmit.pop_front()
    }

    /// The connection ended. Packets not yet drained are dropped: each is sent again when the
    /// peer resends what it answered.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        self.in_window = 0;
        if let Some(q) = self.q.as_deref_mut() {
            q.transmit.clear();
            for ex in q.exchanges.values_mut() {
                ex.seen = false;
            }
        }
    }

    /// A connection is established. Without `session_present` (the peer has no session, or we
    /// start a new one) every exchange is forgotten: an identifier awaiting PUBREL names a new
    /// message next time.
    pub fn resume(&mut self, session_present: bool) {
        self.on_disconnect();
        self.connected = true;
        if !session_present && let Some(q) = self.q.as_deref_mut() {
            q.exchanges.clear();
        }
    }

    /// Changes our Receive Maximum, for the next connection's CONNECT / CONNACK.
    pub fn set_receive_maximum(&mut self, receive_maximum: u16) {
        self.config.receive_maximum = receive_maximum;
    }

    /// Our Receive Maximum.
    pub fn receive_maximum(&self) -> u16 {
        self.config.receive_maximum
    }

    /// The QoS 2 identifiers awaiting PUBREL, for a snapshot (unordered). Messages not yet
    /// acknowledged by the application are not part of it: unacknowledged, they will be resent.
    pub fn awaiting_pubrel(&self) -> impl Iterator<Item = PacketId> + '_ {
        self.q
            .as_deref()
            .into_iter()
            .flat_map(|q| q.exchanges.iter())
            .filter(|(_, ex)| ex.stage == Stage::AwaitingPubRel)
            .map(|(id, _)| *id)
    }

    /// Re-inserts an identifier awaiting PUBREL from a snapshot. Re-inserting one already
    /// awaiting PUBREL does nothing.
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdInUse`] when another exchange holds it.
    pub fn restore_awaiting_pubrel(&mut self, packet_id: PacketId) -> Result<(), StateError> {
        match self.exchange(packet_id).map(|ex| ex.stage) {
            None => {
                self.queues().exchanges.insert(
                    packet_id,
                    Exchange {
                        stage: Stage::AwaitingPubRel,
                        seen: false,
                    },
                );
                Ok(())
            }
            Some(Stage::AwaitingPubRel) => Ok(()),
            Some(_) => Err(StateError::PacketIdInUse {
                packet_id,
                qos: QoS::ExactlyOnce,
            }),
        }
    }

    /// Number of open QoS 1 and 2 exchanges, from this connection and earlier ones.
    pub fn unacknowledged(&self) -> usize {
        self.q.as_deref().map_or(0, |q| q.exchanges.len())
    }

    /// Number of exchanges counted against our Receive Maximum on this connection.
    pub fn in_window(&self) -> usize {
        self.in_window
    }

    /// Whether [`Incoming::resume`] was called since the last [`Incoming::on_disconnect`].
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The protocol version of the connection.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The counters, allocated at first use.
    fn count(&mut self) -> &mut IncomingStats {
        self.stats.get_or_insert_with(Box::default)
    }

    /// The counters.
    pub fn stats(&self) -> &IncomingStats {
        static NONE: IncomingStats = IncomingStats {
            delivered: 0,
            duplicates: 0,
            refused: 0,
            unknown_pubrel: 0,
            early_pubrel: 0,
        };
        self.stats.as_deref().unwrap_or(&NONE)
    }

    /// Records a new exchange whose PUBLISH just arrived.
    fn open(&mut self, packet_id: PacketId, stage: Stage) {
        self.queues()
            .exchanges
            .insert(packet_id, Exchange { stage, seen: true });
        self.in_window += 1;
    }

    fn mark_seen(&mut self, packet_id: PacketId) {
        if let Some(ex) = self
            .q
            .as_deref_mut()
            .and_then(|q| q.exchanges.get_mut(&packet_id))
            && !ex.seen
        {
            ex.seen = true;
            self.in_window += 1;
        }
    }

    fn set_stage(&mut self, packet_id: PacketId, stage: Stage) {
        if let Some(ex) = self
            .q
            .as_deref_mut()
            .and_then(|q| q.exchanges.get_mut(&packet_id))
        {
            ex.stage = stage;
        }
    }

    /// Forgets an exchange: its PUBACK, PUBCOMP or failed PUBREC is being sent.
    fn close(&mut self, packet_id: PacketId) {
        if let Some(ex) = self
            .q
            .as_deref_mut()
            .and_then(|q| q.exchanges.remove(&packet_id))
            && ex.seen
        {
            self.in_window -= 1;
        }
    }

    fn respond(&mut self, qos: QoS, packet_id: PacketId, reason: ReasonCode) {
        if qos == QoS::AtLeastOnce {
            let mut ack = PubAck::new(packet_id);
            ack.reason_code = reason;
            self.send(Packet::PubAck(ack));
        } else {
            let mut rec = PubRec::new(packet_id);
            rec.reason_code = reason;
            self.send(Packet::PubRec(rec));
        }
    }

    fn send(&mut self, packet: Packet) {
        if self.connected {
            self.queues().transmit.push_back(packet);
        }
    }
}
