//! The sending side of QoS 0, 1 and 2: packet identifiers, the inflight window, redelivery.

use super::error::{QueueFull, QueueLimit, StateError};
use super::packet_ids::{IdMap, PacketIds};
use crate::packet::{Packet, PacketId, PacketType, PubAck, PubComp, PubRec, PubRel, Publish};
use crate::properties::Properties;
use crate::qos::QoS;
use crate::reason::ReasonCode;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Names one message handed to [`Outgoing::publish`], from then until its completion.
///
/// Packet identifiers are assigned later (when the message enters the inflight window) and are
/// reused after completion; a ticket is neither. Tickets increase in publish order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Ticket {
    /// The ticket's number, unique within one [`Outgoing`].
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The stage of one QoS 1 or 2 message in flight. Each stage holds exactly what it needs: once
/// PUBREL is sent the peer owns the message, so the payload is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inflight {
    /// QoS 1, PUBLISH sent, awaiting PUBACK. The message is kept for redelivery.
    AwaitingPubAck(Publish),
    /// QoS 2, PUBLISH sent, awaiting PUBREC. The message is kept for redelivery.
    AwaitingPubRec(Publish),
    /// QoS 2, PUBREC received and PUBREL sent, awaiting PUBCOMP.
    AwaitingPubComp,
}

impl Inflight {
    /// The QoS of the exchange.
    pub const fn qos(&self) -> QoS {
        match self {
            Inflight::AwaitingPubAck(_) => QoS::AtLeastOnce,
            Inflight::AwaitingPubRec(_) | Inflight::AwaitingPubComp => QoS::ExactlyOnce,
        }
    }

    /// The packet the exchange waits for.
    pub const fn awaiting(&self) -> PacketType {
        match self {
            Inflight::AwaitingPubAck(_) => PacketType::PubAck,
            Inflight::AwaitingPubRec(_) => PacketType::PubRec,
            Inflight::AwaitingPubComp => PacketType::PubComp,
        }
    }

    /// The message, in the stages that still hold it.
    pub const fn message(&self) -> Option<&Publish> {
        match self {
            Inflight::AwaitingPubAck(p) | Inflight::AwaitingPubRec(p) => Some(p),
            Inflight::AwaitingPubComp => None,
        }
    }
}

/// One inflight exchange, as [`Outgoing::inflight`] shows it for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightEntry<'a> {
    /// The message's ticket.
    pub ticket: Ticket,
    /// Its packet identifier.
    pub packet_id: PacketId,
    /// Its stage (and message). The message carries `packet_id` and its QoS.
    pub stage: &'a Inflight,
}

/// The end of one QoS 1 or 2 exchange: what the caller resolves a waiting publisher with (the
/// client) or deletes the stored message on (the broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The ticket [`Outgoing::publish`] returned for the message.
    pub ticket: Ticket,
    /// The packet identifier the exchange used (free again now).
    pub packet_id: PacketId,
    /// The QoS of the exchange.
    pub qos: QoS,
    /// The reason code of the PUBACK, PUBREC (failure) or PUBCOMP that ended it.
    pub reason_code: ReasonCode,
    /// The properties of that packet (a reason string, user properties).
    pub properties: Properties,
    /// Whether the peer took responsibility for the message: a PUBACK or PUBREC below 0x80.
    /// A QoS 2 exchange that reached PUBCOMP is accepted whatever the PUBCOMP's code: a PUBCOMP
    /// with Packet Identifier not found (0x92) means the PUBREL was seen twice, not that the
    /// message was lost.
    pub accepted: bool,
}

/// What [`Outgoing::resume`] with `session_present == false` hands back: the exchanges the lost
/// session had in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Orphan {
    /// Sent, never acknowledged: the peer may or may not have had it. Returned only under
    /// [`SessionLoss::GiveBack`]; the caller republishes it or fails it.
    Unacknowledged {
        /// The message's ticket.
        ticket: Ticket,
        /// The message, with no packet identifier and DUP clear, ready for
        /// [`Outgoing::publish`].
        message: Publish,
    },
    /// Sent again as a new message at the front of the pending queue, under
    /// [`SessionLoss::Requeue`]. Its ticket stays the same; listed so the caller knows it may
    /// reach the peer twice.
    Requeued {
        /// The message's ticket.
        ticket: Ticket,
    },
    /// A QoS 2 message whose PUBREC had arrived: the peer took it, only the PUBREL / PUBCOMP
    /// bookkeeping was lost. Treat it as delivered.
    Released {
        /// The message's ticket.
        ticket: Ticket,
        /// The packet identifier it had.
        packet_id: PacketId,
    },
}

/// What [`Outgoing::resume`] does with unacknowledged messages when the peer has no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionLoss {
    /// Put them back at the front of the pending queue, in their original order and with their
    /// tickets, to be sent as new messages with fresh packet identifiers. Nothing is lost; a
    /// message the lost session had already forwarded may arrive twice.
    #[default]
    Requeue,
    /// Hand them back to the caller in [`Orphan::Unacknowledged`].
    GiveBack,
}

/// Settings of an [`Outgoing`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutgoingConfig {
    /// The most messages waiting for a place in the inflight window (or for a connection).
    pub max_pending: usize,
    /// The most payload bytes, summed, waiting in the pending queue.
    pub max_pending_bytes: usize,
    /// What [`Outgoing::resume`] does with unacknowledged messages when the session is lost.
    pub session_loss: SessionLoss,
}

impl Default for OutgoingConfig {
    /// 1000 messages, 16 MiB, [`SessionLoss::Requeue`].
    fn default() -> Self {
        OutgoingConfig {
            max_pending: 1000,
            max_pending_bytes: 16 << 20,
            session_loss: SessionLoss::Requeue,
        }
    }
}

impl OutgoingConfig {
    /// Sets [`OutgoingConfig::max_pending`].
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n;
        self
    }

    /// Sets [`OutgoingConfig::max_pending_bytes`].
    pub fn max_pending_bytes(mut self, n: usize) -> Self {
        self.max_pending_bytes = n;
        self
    }

    /// Sets [`OutgoingConfig::session_loss`].
    pub fn session_loss(mut self, s: SessionLoss) -> Self {
        self.session_loss = s;
        self
    }
}

/// Counters for metrics. They only ever grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct OutgoingStats {
    /// Messages accepted by [`Outgoing::publish`].
    pub published: u64,
    /// PUBLISH packets sent for the first time (QoS 0 included).
    pub publish_sent: u64,
    /// PUBLISH packets sent again with DUP set after a reconnection.
    pub publish_resent: u64,
    /// PUBREL packets sent (first time and again).
    pub pubrel_sent: u64,
    /// Exchanges completed with [`Completed::accepted`] true.
    pub accepted: u64,
    /// Exchanges completed with [`Completed::accepted`] false (the peer refused the message).
    pub refused: u64,
    /// Inflight exchanges dropped because the peer had no session ([`Outgoing::resume`]).
    pub orphaned: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    ticket: Ticket,
    packet_id: PacketId,
    stage: Inflight,
    /// Sent (PUBLISH or PUBREL) on the current connection: counts against the window.
    sent: bool,
    /// Handed over with [`Outgoing::publish_reserved`].
    reserved: bool,
}

/// The sender of PUBLISH packets, for one session: assigns packet identifiers, keeps QoS 1 and 2
/// messages until they are acknowledged, resends them after a reconnection, and keeps at most
/// the peer's Receive Maximum exchanges in flight.
///
/// # Calling contract
///
/// An `Outgoing` starts disconnected. Then, for each connection:
///
/// 1. Once CONNACK is sent (broker) or received (client), set the peer's Receive Maximum with
///    [`Outgoing::set_receive_maximum`] and call [`Outgoing::resume`] with the CONNACK's
///    session present flag. Resent packets are queued.
/// 2. Feed the peer's PUBACK, PUBREC and PUBCOMP to [`Outgoing::handle_puback`],
///    [`Outgoing::handle_pubrec`] and [`Outgoing::handle_pubcomp`]; each completion is returned.
///    Add messages at any time with [`Outgoing::publish`].
/// 3. After any of these calls, drain [`Outgoing::poll_transmit`] until it returns `None` and
///    write the packets out in that order.
/// 4. When the connection ends, call [`Outgoing::on_disconnect`]. Packets not yet drained are
///    dropped; what they carried is sent again on the next [`Outgoing::resume`].
///
/// Publishing while disconnected is allowed: the message waits in the pending queue.
///
/// There is no retransmission timer, so no `poll_timeout`: MQTT resends only when a session
/// resumes on a new connection [MQTT-4.4.0-1], never on a timer within one (TCP does that).
///
/// The window counts every exchange whose PUBLISH or PUBREL went out on this connection and
/// is not finished, and a new message enters it only when fewer than Receive Maximum are in
/// flight in total. That is a little stricter than the specification's send quota (which a
/// PUBREL does not use) and is what keeps a resumed session within a lowered Receive Maximum.
///
/// # Example
///
/// ```
/// use qosmos_mqtt::state::{Outgoing, OutgoingConfig};
/// use qosmos_mqtt::{Packet, PubAck, Publish, QoS};
///
/// let mut out = Outgoing::new(OutgoingConfig::default());
/// out.resume(false);
/// let mut msg = Publish::new("orders/42", "created");
/// msg.qos = QoS::AtLeastOnce;
/// let ticket = out.publish(msg)?;
/// let Some(Packet::Publish(sent)) = out.poll_transmit() else { panic!() };
/// let pid = sent.packet_id.expect("QoS 1 has a packet identifier");
/// let done = out.handle_puback(&PubAck::new(pid))?;
/// assert_eq!(done.ticket, ticket);
/// assert!(done.accepted);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Outgoing {
    config: OutgoingConfig,
    receive_maximum: u16,
    connected: bool,
    next_ticket: u64,
    /// Orders `entries`: the order in which exchanges entered the window.
    next_seq: u64,
    ids: PacketIds,
    sent_count: usize,
    pending_bytes: usize,
    /// Allocated by the first count: a broker holds an `Outgoing` per session, and most of an
    /// idle session's memory is what it holds inline.
    stats: Option<Box<OutgoingStats>>,
    /// The queues, allocated by the first message or reservation: a broker holds an
    /// `Outgoing` per session, and many sessions never send anything.
    q: Option<Box<Queues>>,
}

/// What an [`Outgoing`] queues and tracks.
#[derive(Debug, Clone, Default)]
struct Queues {
    /// Inflight exchanges in the order their PUBLISH was first sent.
    entries: BTreeMap<u64, Entry>,
    by_id: IdMap<u64>,
    /// Identifiers taken with [`Outgoing::reserve_packet_id`].
    reserved: BTreeSet<PacketId>,
    /// Identifiers and window slots taken with [`Outgoing::reserve_publish`], for messages not
    /// handed over yet.
    held: BTreeSet<PacketId>,
    /// Inflight exchanges not yet resent on this connection because the window was full.
    parked: VecDeque<u64>,
    pending: VecDeque<(Ticket, Publish)>,
    transmit: VecDeque<Packet>,
}

impl Queues {
    /// Tracks an inflight exchange: in `entries` by its order, in `by_id` by its packet id
    /// (the two kept together here).
    fn track(&mut self, seq: u64, entry: Entry) {
        self.by_id.insert(entry.packet_id, seq);
        self.entries.insert(seq, entry);
    }

    /// Whether `id` is taken: in flight or reserved.
    fn in_use(&self, id: PacketId) -> bool {
        self.by_id.contains_key(&id) || self.reserved.contains(&id) || self.held.contains(&id)
    }
}

/// What an `Outgoing` without queues reads.
static NO_ENTRIES: BTreeMap<u64, Entry> = BTreeMap::new();
static NO_PENDING: VecDeque<(Ticket, Publish)> = VecDeque::new();

impl Default for Outgoing {
    fn default() -> Self {
        Outgoing::new(OutgoingConfig::default())
    }
}

impl Outgoing {
    /// A disconnected sender with nothing in flight and a Receive Maximum of 65535.
    pub fn new(config: OutgoingConfig) -> Outgoing {
        Outgoing {
            config,
            receive_maximum: u16::MAX,
            connected: false,
            next_ticket: 0,
            next_seq: 0,
            ids: PacketIds::new(),
            sent_count: 0,
            pending_bytes: 0,
            stats: None,
            q: None,
        }
    }

    /// The queues, allocated if need be.
    fn queues(&mut self) -> &mut Queues {
        self.q.get_or_insert_with(Default::default)
    }

    fn entries(&self) -> &BTreeMap<u64, Entry> {
        self.q.as_deref().map_or(&NO_ENTRIES, |q| &q.entries)
    }

    fn pending_queue(&self) -> &VecDeque<(Ticket, Publish)> {
        self.q.as_deref().map_or(&NO_PENDING, |q| &q.pending)
    }

    /// Sets the peer's Receive Maximum: the most QoS 1 and 2 exchanges in flight at once. Call it
    /// before [`Outgoing::resume`], from the CONNACK (client) or CONNECT (broker); 65535 when the
    /// property is absent. Zero is a protocol error the codec rejects; it is treated as 1.
    ///
    /// A lower value than the number in flight is honoured on resume: the excess waits.
    pub fn set_receive_maximum(&mut self, receive_maximum: u16) {
        self.receive_maximum = receive_maximum.max(1);
        self.refill();
    }

    /// The peer's Receive Maximum in force.
    pub fn receive_maximum(&self) -> u16 {
        self.receive_maximum
    }

    /// Queues a message. `msg.packet_id` and `msg.dup` are ignored.
    ///
    /// While connected, QoS 0 goes straight to [`Outgoing::poll_transmit`]. QoS 1 and 2 get a
    /// packet identifier and are sent when the inflight window has room and every message
    /// published before has been sent; otherwise they wait in the pending queue, in order.
    /// While disconnected every QoS waits.
    ///
    /// # Errors
    ///
    /// [`QueueFull`] when the message would have to wait and the pending queue is at its bound;
    /// the message is handed back and nothing changes.
    pub fn publish(&mut self, mut msg: Publish) -> Result<Ticket, QueueFull> {
        msg.dup = false;
        msg.packet_id = None;
        if msg.qos == QoS::AtMostOnce && self.connected {
            let ticket = self.next_ticket();
            count(&mut self.stats).published += 1;
            count(&mut self.stats).publish_sent += 1;
            self.queues().transmit.push_back(Packet::Publish(msg));
            return Ok(ticket);
        }
        let goes_now = self.connected
            && self
                .q
                .as_deref()
                .is_none_or(|q| q.pending.is_empty() && q.parked.is_empty())
            && self.window_used() < usize::from(self.receive_maximum);
        if !goes_now {
            if self.pending_queue().len() >= self.config.max_pending {
                return Err(QueueFull {
                    message: Box::new(msg),
                    limit: QueueLimit::Count(self.config.max_pending),
                });
            }
            if self.pending_bytes.saturating_add(msg.payload.len()) > self.config.max_pending_bytes
            {
                return Err(QueueFull {
                    message: Box::new(msg),
                    limit: QueueLimit::Bytes(self.config.max_pending_bytes),
                });
            }
        }
        let ticket = self.next_ticket();
        count(&mut self.stats).published += 1;
        self.pending_bytes += msg.payload.len();
        self.queues().pending.push_back((ticket, msg));
        self.refill();
        Ok(ticket)
    }

    /// Handles a PUBACK: ends the QoS 1 exchange it names, whatever its reason code.
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdNotFound`] for an identifier not in flight,
    /// [`StateError::UnexpectedPacket`] for a QoS 2 exchange. Nothing changes.
    pub fn handle_puback(&mut self, ack: &PubAck) -> Result<Completed, StateError> {
        let seq = self.expect(ack.packet_id, PacketType::PubAck, |s| {
            matches!(s, Inflight::AwaitingPubAck(_))
        })?;
        let accepted = ack.reason_code.is_success();
        Ok(self.complete(seq, ack.reason_code, &ack.properties, accepted))
    }

    /// Handles a PUBREC. Success: the message is released (its payload dropped) and PUBREL is
    /// queued; `Ok(None)`. A reason code of 0x80 or more ends the exchange without PUBREL and
    /// returns its completion, not accepted.
    ///
    /// A repeated successful PUBREC for an exchange already awaiting PUBCOMP queues PUBREL again
    /// (PUBREL is idempotent at the receiver).
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdNotFound`] for an identifier not in flight,
    /// [`StateError::UnexpectedPacket`] for a QoS 1 exchange, or a failed PUBREC after PUBREL.
    pub fn handle_pubrec(&mut self, rec: &PubRec) -> Result<Option<Completed>, StateError> {
        let success = rec.reason_code.is_success();
        let seq = self.expect(rec.packet_id, PacketType::PubRec, |s| match s {
            Inflight::AwaitingPubRec(_) => true,
            Inflight::AwaitingPubComp => success,
            Inflight::AwaitingPubAck(_) => false,
        })?;
        if !success {
            return Ok(Some(self.complete(
                seq,
                rec.reason_code,
                &rec.properties,
                false,
            )));
        }
        if let Some(q) = self.q.as_deref_mut()
            && let Some(entry) = q.entries.get_mut(&seq)
        {
            entry.stage = Inflight::AwaitingPubComp;
            if entry.sent && self.connected {
                count(&mut self.stats).pubrel_sent += 1;
                q.transmit
                    .push_back(Packet::PubRel(PubRel::new(rec.packet_id)));
            }
        }
        Ok(None)
    }

    /// Handles a PUBCOMP: ends the QoS 2 exchange it names, whatever its reason code.
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdNotFound`] for an identifier not in flight,
    /// [`StateError::UnexpectedPacket`] for an exchange that has not had its PUBREC.
    pub fn handle_pubcomp(&mut self, comp: &PubComp) -> Result<Completed, StateError> {
        let seq = self.expect(comp.packet_id, PacketType::PubComp, |s| {
            matches!(s, Inflight::AwaitingPubComp)
        })?;
        Ok(self.complete(seq, comp.reason_code, &comp.properties, true))
    }

    /// The next packet to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.q.as_deref_mut()?.transmit.pop_front()
    }

    /// The connection ended. Packets not yet drained are dropped; inflight exchanges and the
    /// pending queue are kept for [`Outgoing::resume`].
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        self.sent_count = 0;
        if let Some(q) = self.q.as_deref_mut() {
            q.transmit.clear();
            q.parked.clear();
            for entry in q.entries.values_mut() {
                entry.sent = false;
            }
        }
    }

    /// A connection is established (CONNACK sent or received).
    ///
    /// With `session_present`, every inflight exchange is sent again in its original order
    /// ([MQTT-4.4.0-1], [MQTT-4.6.0-1]): PUBLISH with DUP set and the same packet identifier for the unacknowledged
    /// ones, PUBREL for those awaiting PUBCOMP; at most Receive Maximum of them, the rest as room
    /// frees up. Then pending messages follow.
    ///
    /// Without it, the peer has no session: inflight state is cleared and each exchange is
    /// returned as an [`Orphan`], following [`OutgoingConfig::session_loss`]. Pending messages
    /// are then sent as usual.
    ///
    /// Calling it while connected first behaves as [`Outgoing::on_disconnect`].
    #[must_use = "orphans returned when the session is lost must be resolved"]
    pub fn resume(&mut self, session_present: bool) -> Vec<Orphan> {
        self.on_disconnect();
        self.connected = true;
        let mut orphans = Vec::new();
        if session_present {
            if let Some(q) = self.q.as_deref_mut() {
                q.parked.extend(q.entries.keys().copied());
            }
        } else {
            let entries = match self.q.as_deref_mut() {
                Some(q) => {
                    q.by_id.clear();
                    std::mem::take(&mut q.entries)
                }
                None => BTreeMap::new(),
            };
            let mut requeue = Vec::new();
            for entry in entries.into_values() {
                let ticket = entry.ticket;
                count(&mut self.stats).orphaned += 1;
                match entry.stage {
                    Inflight::AwaitingPubAck(mut message)
                    | Inflight::AwaitingPubRec(mut message) => {
                        message.packet_id = None;
                        message.dup = false;
                        match self.config.session_loss {
                            SessionLoss::Requeue => {
                                orphans.push(Orphan::Requeued { ticket });
                                requeue.push((ticket, message));
                            }
                            SessionLoss::GiveBack => {
                                orphans.push(Orphan::Unacknowledged { ticket, message });
                            }
                        }
                    }
                    Inflight::AwaitingPubComp => orphans.push(Orphan::Released {
                        ticket,
                        packet_id: entry.packet_id,
                    }),
                }
            }
            for (ticket, message) in requeue.into_iter().rev() {
                self.pending_bytes += message.payload.len();
                self.queues().pending.push_front((ticket, message));
            }
        }
        self.refill();
        orphans
    }

    /// Re-inserts an inflight exchange loaded from a durable store, after the ones already in
    /// flight. Call it in the order of [`Outgoing::inflight`] at snapshot time, normally before
    /// [`Outgoing::resume`]. The message's QoS and packet identifier are set from the stage and
    /// `packet_id`. It is sent again (DUP set, or PUBREL) like any other inflight exchange.
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdInUse`] if `packet_id` is already in flight or reserved.
    pub fn restore_inflight(
        &mut self,
        packet_id: PacketId,
        mut stage: Inflight,
    ) -> Result<Ticket, StateError> {
        let qos = stage.qos();
        let in_use = self.q.as_deref().is_some_and(|q| q.in_use(packet_id));
        if in_use {
            return Err(StateError::PacketIdInUse { packet_id, qos });
        }
        if let Inflight::AwaitingPubAck(p) | Inflight::AwaitingPubRec(p) = &mut stage {
            p.qos = qos;
            p.packet_id = Some(packet_id);
            p.dup = false;
        }
        let ticket = self.next_ticket();
        let seq = self.next_seq();
        let connected = self.connected;
        let q = self.queues();
        q.track(
            seq,
            Entry {
                ticket,
                packet_id,
                stage,
                sent: false,
                reserved: false,
            },
        );
        if connected {
            q.parked.push_back(seq);
            self.refill();
        }
        Ok(ticket)
    }

    /// The inflight exchanges in their original order, for a snapshot.
    pub fn inflight(&self) -> impl ExactSizeIterator<Item = InflightEntry<'_>> + '_ {
        self.entries().values().map(|e| InflightEntry {
            ticket: e.ticket,
            packet_id: e.packet_id,
            stage: &e.stage,
        })
    }

    /// The ticket of the exchange in flight with `packet_id`, if any: lets a caller that keeps
    /// per-message data by ticket (a durable store) name the message a PUBLISH or PUBREL from
    /// [`Outgoing::poll_transmit`] belongs to.
    ///
    /// ```
    /// use qosmos_mqtt::state::{Outgoing, OutgoingConfig};
    /// use qosmos_mqtt::{Packet, Publish, QoS};
    ///
    /// let mut out = Outgoing::new(OutgoingConfig::default());
    /// out.resume(false);
    /// let mut msg = Publish::new("orders/42", "created");
    /// msg.qos = QoS::ExactlyOnce;
    /// let ticket = out.publish(msg)?;
    /// let Some(Packet::Publish(sent)) = out.poll_transmit() else { panic!() };
    /// let pid = sent.packet_id.expect("QoS 2 has a packet identifier");
    /// assert_eq!(out.ticket_of(pid), Some(ticket));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ticket_of(&self, packet_id: PacketId) -> Option<Ticket> {
        let q = self.q.as_deref()?;
        let seq = q.by_id.get(&packet_id)?;
        q.entries.get(seq).map(|e| e.ticket)
    }

    /// The messages waiting for the inflight window, oldest first, for a snapshot (republish
    /// them with [`Outgoing::publish`] after restoring the inflight ones).
    pub fn pending(&self) -> impl ExactSizeIterator<Item = (Ticket, &Publish)> + '_ {
        self.pending_queue().iter().map(|(t, p)| (*t, p))
    }

    /// Number of QoS 1 and 2 exchanges in flight.
    pub fn in_flight(&self) -> usize {
        self.entries().len()
    }

    /// Number of messages in the pending queue.
    pub fn pending_len(&self) -> usize {
        self.pending_queue().len()
    }

    /// Payload bytes in the pending queue.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// True when nothing is in flight, pending, reserved with [`Outgoing::reserve_publish`], or
    /// waiting to be drained.
    pub fn is_idle(&self) -> bool {
        self.q.as_deref().is_none_or(|q| {
            q.entries.is_empty()
                && q.pending.is_empty()
                && q.transmit.is_empty()
                && q.held.is_empty()
        })
    }

    /// Whether [`Outgoing::resume`] was called since the last [`Outgoing::on_disconnect`].
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The counters.
    pub fn stats(&self) -> &OutgoingStats {
        static NONE: OutgoingStats = OutgoingStats {
            published: 0,
            publish_sent: 0,
            publish_resent: 0,
            pubrel_sent: 0,
            accepted: 0,
            refused: 0,
            orphaned: 0,
        };
        self.stats.as_deref().unwrap_or(&NONE)
    }

    /// Takes a packet identifier for a SUBSCRIBE or UNSUBSCRIBE, which share the identifier
    /// space with PUBLISH [MQTT-2.2.1-3]. It is never given to a PUBLISH until released. `None`
    /// when all 65535 are in use.
    pub fn reserve_packet_id(&mut self) -> Option<PacketId> {
        let q = self.q.get_or_insert_with(Default::default);
        let id = self.ids.allocate(|id| q.in_use(id))?;
        q.reserved.insert(id);
        Some(id)
    }

    /// Takes a packet identifier and a place in the inflight window for a QoS 1 or 2 message
    /// that is not handed over yet: for a caller that must make the identifier durable before
    /// the message may go out (a broker's write-ahead log), and wants to record it together with
    /// the message rather than after. Hand the message over with [`Outgoing::publish_reserved`]
    /// (or give the reservation up with [`Outgoing::cancel_reserved_publish`]).
    ///
    /// `None` unless a message published now would be sent at once: connected, nothing pending
    /// or waiting to be resent, and room in the window (which counts these reservations).
    /// Reservations keep their place across a disconnection; in between, [`Outgoing::publish`]
    /// counts them as in flight.
    ///
    /// ```
    /// use qosmos_mqtt::state::{Outgoing, OutgoingConfig};
    /// use qosmos_mqtt::{Packet, Publish, QoS};
    ///
    /// let mut out = Outgoing::new(OutgoingConfig::default());
    /// out.resume(false);
    /// let pid = out.reserve_publish().expect("the window has room");
    /// // … record `pid` durably with the message …
    /// let mut msg = Publish::new("orders/42", "created");
    /// msg.qos = QoS::ExactlyOnce;
    /// out.publish_reserved(pid, msg)?;
    /// let Some(Packet::Publish(sent)) = out.poll_transmit() else { panic!() };
    /// assert_eq!((sent.packet_id, sent.dup), (Some(pid), false));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reserve_publish(&mut self) -> Option<PacketId> {
        let room = self.connected
            && self
                .q
                .as_deref()
                .is_none_or(|q| q.pending.is_empty() && q.parked.is_empty())
            && self.window_used() < usize::from(self.receive_maximum);
        if !room {
            return None;
        }
        let q = self.q.get_or_insert_with(Default::default);
        let id = self.ids.allocate(|id| q.in_use(id))?;
        q.held.insert(id);
        Some(id)
    }

    /// Hands over a QoS 1 or 2 message with the packet identifier taken for it with
    /// [`Outgoing::reserve_publish`]: it enters the window with that identifier, and is sent at
    /// once (DUP clear) when connected and the window has room, else as soon as it has (a resend
    /// after a reconnection, DUP set, like every exchange in flight then).
    ///
    /// # Errors
    ///
    /// [`StateError::PacketIdNotFound`] when `packet_id` is not reserved so (e.g. given up with
    /// [`Outgoing::cancel_reserved_publish`]), [`StateError::UnexpectedPacket`] for a QoS 0
    /// message (the reservation is then kept). Nothing changes: publish it with
    /// [`Outgoing::publish`] instead.
    pub fn publish_reserved(
        &mut self,
        packet_id: PacketId,
        mut msg: Publish,
    ) -> Result<Ticket, StateError> {
        let held = self
            .q
            .as_deref()
            .is_some_and(|q| q.held.contains(&packet_id));
        if !held {
            return Err(StateError::PacketIdNotFound {
                packet: PacketType::Publish,
                packet_id,
            });
        }
        if msg.qos == QoS::AtMostOnce {
            return Err(StateError::UnexpectedPacket {
                packet: PacketType::Publish,
                packet_id,
                expected: PacketType::PubAck,
            });
        }
        msg.dup = false;
        msg.packet_id = Some(packet_id);
        let stage = if msg.qos == QoS::AtLeastOnce {
            Inflight::AwaitingPubAck(msg.clone())
        } else {
            Inflight::AwaitingPubRec(msg.clone())
        };
        let ticket = self.next_ticket();
        let seq = self.next_seq();
        count(&mut self.stats).published += 1;
        let now = self.connected && self.sent_count < usize::from(self.receive_maximum);
        let connected = self.connected;
        let q = self.queues();
        q.held.remove(&packet_id);
        let now = now && q.parked.is_empty();
        q.track(
            seq,
            Entry {
                ticket,
                packet_id,
                stage,
                sent: now,
                reserved: true,
            },
        );
        if now {
            q.transmit.push_back(Packet::Publish(msg));
            self.sent_count += 1;
            count(&mut self.stats).publish_sent += 1;
        } else if connected {
            q.parked.push_back(seq);
            self.refill();
        }
        Ok(ticket)
    }

    /// Whether the exchange in flight with `packet_id` was handed over with
    /// [`Outgoing::publish_reserved`]: tells the caller that its PUBLISH from
    /// [`Outgoing::poll_transmit`] carries the identifier it reserved (and recorded).
    pub fn was_reserved(&self, packet_id: PacketId) -> bool {
        self.q.as_deref().is_some_and(|q| {
            q.by_id
                .get(&packet_id)
                .and_then(|seq| q.entries.get(seq))
                .is_some_and(|e| e.reserved)
        })
    }

    /// Gives up a reservation of [`Outgoing::reserve_publish`]: its identifier and place in the
    /// window are free again. False if it was not reserved so.
    pub fn cancel_reserved_publish(&mut self, packet_id: PacketId) -> bool {
        let cancelled = self
            .q
            .as_deref_mut()
            .is_some_and(|q| q.held.remove(&packet_id));
        if cancelled {
            self.refill();
        }
        cancelled
    }

    /// Takes over `from`'s reserved identifiers (of [`Outgoing::reserve_packet_id`] and
    /// [`Outgoing::reserve_publish`]) and where it is in handing out identifiers: for a caller
    /// that rebuilds an `Outgoing` from another's [`Outgoing::inflight`] and
    /// [`Outgoing::pending`], so that what was reserved there can still be handed over here.
    pub fn keep_reservations(&mut self, from: &Outgoing) {
        self.ids = from.ids.clone();
        if let Some(f) = from.q.as_deref()
            && !(f.reserved.is_empty() && f.held.is_empty())
        {
            let q = self.queues();
            q.reserved.extend(f.reserved.iter().copied());
            q.held.extend(f.held.iter().copied());
        }
    }

    /// Places in the window: exchanges in flight and reservations of
    /// [`Outgoing::reserve_publish`].
    fn window_used(&self) -> usize {
        self.q
            .as_deref()
            .map_or(0, |q| q.entries.len() + q.held.len())
    }

    /// Gives back an identifier from [`Outgoing::reserve_packet_id`] (on SUBACK / UNSUBACK).
    /// False if it was not reserved.
    pub fn release_packet_id(&mut self, packet_id: PacketId) -> bool {
        let released = self
            .q
            .as_deref_mut()
            .is_some_and(|q| q.reserved.remove(&packet_id));
        if released {
            self.refill();
        }
        released
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn next_ticket(&mut self) -> Ticket {
        let t = Ticket(self.next_ticket);
        self.next_ticket += 1;
        t
    }

    /// The key of the exchange `packet_id`, if its stage passes `ok`.
    fn expect(
        &self,
        packet_id: PacketId,
        packet: PacketType,
        ok: impl Fn(&Inflight) -> bool,
    ) -> Result<u64, StateError> {
        let entry = self.q.as_deref().and_then(|q| {
            q.by_id
                .get(&packet_id)
                .and_then(|seq| q.entries.get(seq).map(|e| (*seq, e)))
        });
        match entry {
            None => Err(StateError::PacketIdNotFound { packet, packet_id }),
            Some((seq, e)) if ok(&e.stage) => Ok(seq),
            Some((_, e)) => Err(StateError::UnexpectedPacket {
                packet,
                packet_id,
                expected: e.stage.awaiting(),
            }),
        }
    }

    fn complete(
        &mut self,
        seq: u64,
        reason_code: ReasonCode,
        properties: &Properties,
        accepted: bool,
    ) -> Completed {
        let removed = self.q.as_deref_mut().and_then(|q| {
            let entry = q.entries.remove(&seq)?;
            q.by_id.remove(&entry.packet_id);
            Some(entry)
        });
        let (ticket, packet_id, qos) = match removed {
            Some(entry) => {
                if entry.sent {
                    self.sent_count -= 1;
                }
                (entry.ticket, entry.packet_id, entry.stage.qos())
            }
            // `expect` found the entry just before; this arm is never taken.
            None => unreachable!("completing an exchange that is not in flight"),
        };
        if accepted {
            count(&mut self.stats).accepted += 1;
        } else {
            count(&mut self.stats).refused += 1;
        }
        self.refill();
        Completed {
            ticket,
            packet_id,
            qos,
            reason_code,
            properties: properties.clone(),
            accepted,
        }
    }

    /// Sends what the window has room for: parked exchanges first, then pending messages.
    fn refill(&mut self) {
        if !self.connected {
            return;
        }
        let Some(q) = self.q.as_deref_mut() else {
            return;
        };
        let max = usize::from(self.receive_maximum);
        while self.sent_count < max {
            let Some(seq) = q.parked.pop_front() else {
                break;
            };
            let Some(entry) = q.entries.get_mut(&seq) else {
                continue;
            };
            if entry.sent {
                continue;
            }
            entry.sent = true;
            self.sent_count += 1;
            match &entry.stage {
                Inflight::AwaitingPubAck(p) | Inflight::AwaitingPubRec(p) => {
                    let mut p = p.clone();
                    p.dup = true;
                    count(&mut self.stats).publish_resent += 1;
                    q.transmit.push_back(Packet::Publish(p));
                }
                Inflight::AwaitingPubComp => {
                    count(&mut self.stats).pubrel_sent += 1;
                    q.transmit
                        .push_back(Packet::PubRel(PubRel::new(entry.packet_id)));
                }
            }
        }
        if !q.parked.is_empty() {
            return;
        }
        while let Some((_, front)) = q.pending.front() {
            if front.qos == QoS::AtMostOnce {
                if let Some((_, msg)) = q.pending.pop_front() {
                    self.pending_bytes -= msg.payload.len();
                    count(&mut self.stats).publish_sent += 1;
                    q.transmit.push_back(Packet::Publish(msg));
                }
                continue;
            }
            if q.entries.len() + q.held.len() >= max {
                break;
            }
            let Some(packet_id) = self.ids.allocate(|id| q.in_use(id)) else {
                break;
            };
            let Some((ticket, mut msg)) = q.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= msg.payload.len();
            msg.packet_id = Some(packet_id);
            let stage = if msg.qos == QoS::AtLeastOnce {
                Inflight::AwaitingPubAck(msg.clone())
            } else {
                Inflight::AwaitingPubRec(msg.clone())
            };
            count(&mut self.stats).publish_sent += 1;
            q.transmit.push_back(Packet::Publish(msg));
            self.next_seq += 1;
            let seq = self.next_seq;
            q.track(
                seq,
                Entry {
                    ticket,
                    packet_id,
                    stage,
                    sent: true,
                    reserved: false,
                },
            );
            self.sent_count += 1;
        }
    }
}

/// An [`Outgoing`]'s counters, allocated at first use (a free function: the queues may be
/// borrowed meanwhile).
fn count(stats: &mut Option<Box<OutgoingStats>>) -> &mut OutgoingStats {
    stats.get_or_insert_with(Box::default)
}
